"""Helpers for the viewer test: OHIF Viewer 3 over Orthanc DICOMweb, driven by headless Chromium."""
