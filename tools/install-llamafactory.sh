#!/usr/bin/env bash
# Install LLaMA-Factory's code, pinned and without its dependency list, into the active Python environment
# (or the one of $PYTHON), after xmas and lmms-eval (tools/install-lmms-eval.sh brings `datasets`):
# tests/stages/test_llamafactory.py reads `xmas llamafactory`'s output with LLaMA-Factory's own dataset
# parser and converter. Its dependency list pins a transformers older than xmas's and pulls torchaudio and
# torchvision, which break beside the CPU torch; the modules the test uses need none of them.
set -euo pipefail
PYTHON=${PYTHON:-python}

"$PYTHON" -m pip install --no-deps "llamafactory==0.9.5"
"$PYTHON" -c "import llamafactory, datasets; \
print('LLaMA-Factory', __import__('importlib.metadata').metadata.version('llamafactory'), 'ready')"
