"""The backprop baseline, its lists and the script that runs one."""
