"""Calibration: statistics, smoothing/rotation, quantizers and fusion-weight learning (``qavtp.calibrate``)."""
