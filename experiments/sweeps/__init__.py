"""Sweep runner (Dask), its lists (lists/), and the scripts that summarise and plot sweeps."""
