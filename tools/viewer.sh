#!/bin/sh
# Look at the node's results the way a radiologist would: OHIF Viewer 3 (the pinned npm build that
# the viewer test uses) over Orthanc with its DICOMweb plugin, both on this machine.
#
# Usage: tools/viewer.sh [--port 3000] [--orthanc-port 8042] [--dicom-port 4242] [DICOM files or folders...]
#   e.g. tools/viewer.sh var/outbox path/to/the/ct/study     then open the printed URL
# The files are loaded through Orthanc's REST API; with --dicom-port, Orthanc also takes C-STORE
# (point a node destination at AE ORTHANC, 127.0.0.1, that port).  Studies stay in var/viewer/.
# Installs (Debian orthanc, orthanc-dicomweb, the OHIF build under .cache/ohif): `make system-deps`.
# The viewer answers on 127.0.0.1 only; Orthanc refuses remote HTTP clients, but its ports bind
# every interface (Orthanc has no loopback-only option), so --dicom-port is off by default.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec env PYTHONPATH=tests "$PY" -m viewer.ohif "$@"
