"""Preprocessing shared by the app and training: masks, denoising, bias correction,
tissue labels, template brain masks, B-spline resampling."""
