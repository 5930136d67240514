"""Labelled data for accuracy and calibration: image folders, IDX, text files, packaged data sets."""
