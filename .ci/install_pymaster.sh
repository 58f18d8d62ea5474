#!/usr/bin/env bash
# Builds pymaster (NaMaster) from its source package against Debian's chealpix, GSL, FFTW and CFITSIO,
# for the NaMaster cross-check of the flat-sky spectra (tests/test_namaster.py). pymaster 3.0.1's own
# build downloads chealpix, which fails offline: setup.py skips that download when
# _deps/lib/libchealpix.a exists, and Debian's static libchealpix.a is not position-independent, so
# that file is a one-line linker script pointing at the shared library instead.
set -euo pipefail
apt-get update -qq
apt-get install -y -qq libchealpix-dev libgsl-dev libfftw3-dev libcfitsio-dev > /dev/null
work=$(mktemp -d)
pip download --no-deps --no-build-isolation pymaster==3.0.1 -d "$work"
cd "$work"
tar xzf pymaster-3.0.1.tar.gz
cd pymaster-3.0.1
mkdir -p _deps/lib _deps/include
cp /usr/include/chealpix.h _deps/include/
echo "INPUT($(find /usr/lib -name libchealpix.so | head -n 1))" > _deps/lib/libchealpix.a
pip install .
