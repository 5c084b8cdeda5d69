"""Temporary alias while imports move to medclf_node.synthetic.phantoms."""

from medclf_node.synthetic.phantoms import *  # noqa: F403
