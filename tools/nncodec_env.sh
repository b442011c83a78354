#!/bin/sh
# NNCodec 2.1.3 (Fraunhofer HHI's MPEG NNR / DeepCABAC), the peer of bench/nncodec_side.py, in its own
# virtual environment outside the repo (default /work/nncodec-env; first argument to change it):
#   sh tools/nncodec_env.sh [DIR]   then   NNCODEC_PYTHON=DIR/bin/python make bench
# The smallest set that imports nncodec.nn and codes: the CPU torch on disk first (an unpinned torch pulls
# a CUDA build), numpy<2 (nncodec's pin), then nncodec built from its sdist without its declared
# dependencies (its C++ extension: pybind11 and g++, ~3 CPU-minutes), then the modules its package
# imports at load time. torchvision is left out: the wheels on disk are CUDA builds whose operators do not
# load beside the CPU torch; bench/nncodec_peer.py stands an inert module in for it (nncodec imports it
# for its training applications only). ptflops and torchmetrics are never imported on this path.
set -eu
DIR=${1:-/work/nncodec-env}
PY=${PYTHON:-python3}
$PY -m venv "$DIR"
"$DIR/bin/pip" install -q torch==2.13.0
"$DIR/bin/pip" install -q "numpy<2" pybind11 wheel setuptools
"$DIR/bin/pip" install -q --no-deps --no-build-isolation nncodec==2.1.3
"$DIR/bin/pip" install -q "pandas<2.3" "scikit-learn<1.6" "opencv-python-headless<4.11" h5py tqdm click
WANDB_MODE=disabled "$DIR/bin/python" -c "
import sys, types
sys.path.insert(0, '$(dirname "$0")/../bench')
import nncodec_peer
nncodec_peer._stand_in_torchvision()
from nncodec.nn import encode, decode
print('nncodec ready:', sys.executable)"
