"""The data movement (ByteDMD) of FF against backprop: the cost model and the measurements."""
