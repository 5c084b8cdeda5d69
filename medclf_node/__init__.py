"""medclf-node: a DICOM node that classifies CT series and reports back into the study."""

__version__ = "0.1.0"
