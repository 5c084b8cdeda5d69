"""Synthetic chest CT phantoms written as real DICOM series.

They live in the node (numpy, scipy and pydicom only) because `medclf-node demo` needs them and
the node never imports the training package; training imports them from here.
"""
