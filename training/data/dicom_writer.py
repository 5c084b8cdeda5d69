"""Temporary alias while imports move to medclf_node.synthetic.dicom_writer."""

from medclf_node.synthetic.dicom_writer import *  # noqa: F403
