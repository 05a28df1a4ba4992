#!/bin/sh
# The Python packages bench/gpu_check.py needs that the lent GPU image lacks (it has torch, accelerate, pandas,
# pyarrow, tokenizers, transformers 5.17; no trl, datasets, bitsandbytes): the versions this repo runs with, as
# Python 3.12 wheels in bench/.whl (ignored by git, ~60 MB, under the device tool's 64 MiB carry: bitsandbytes is 43
# MB of it), with regex and fsspec at versions transformers and datasets accept. Run here, once; the device run then
# carries bench/.whl:
#   sh bench/gpu_wheels.sh
#   run(carry=["bench/.whl"], timeout_s=600, command=
#     "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site bench/.whl/*.whl
#      && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json
#      2>&1 | tee $OUT/gpu_check.log")
set -e
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 peft==0.21.2 \
  regex==2026.11.19 fsspec==2026.9.0 bitsandbytes==0.50.2
ls -l .whl
