#!/usr/bin/env bash
# Install lmms-eval for `xmas evaluate --suite lmms-eval` (docs/lmms-eval.md) into the active Python
# environment (or the one of $PYTHON), after xmas itself (`pip install torch==2.13.0 && pip install -e .`).
#
# lmms-eval's own dependency list would pull an unpinned torchvision (which breaks beside the CPU torch
# wheel), wandb, yt-dlp, openai and dozens more. So lmms-eval goes in without it, pinned, plus exactly
# what its command line and its llava_hf model import; torch, transformers, accelerate, peft, pandas,
# pillow, pydantic, jinja2 and tenacity come from xmas's own dependencies.
set -euo pipefail
PYTHON=${PYTHON:-python}

"$PYTHON" -m pip install \
    "datasets==5.2.0" \
    "evaluate==0.4.6" \
    "sacrebleu==2.6.0" \
    "loguru==0.7.3" \
    "pytz==2026.6" \
    "pytablewriter==1.2.1" \
    "decord==0.6.0" \
    "av==15.1.0" \
    "filelock==3.32.7"
# filelock 3.x: lmms-eval 0.7.3 patches filelock._api, which filelock 4 no longer has.
# decord: imported by the llava_hf model file (for videos) even when only images are evaluated; av (PyAV,
# below lmms-eval's 16) likewise by its gemma3 model.
"$PYTHON" -m pip install --no-deps "lmms-eval==0.7.3"

# What `python -m lmms_eval --model llava_hf` (the Llava family) and the models xmas registers (lmms-eval's Qwen,
# InternVL, LLaVA-OneVision and Gemma 3 models) import, so a missing module fails here.
"$PYTHON" -c "import lmms_eval.__main__, lmms_eval.evaluator, lmms_eval.models.simple.llava_hf, \
lmms_eval.models.chat.llava_hf, xmas.evaluation.lmms_eval_qwen, pytablewriter; \
print('lmms-eval', __import__('importlib.metadata').metadata.version('lmms-eval'), 'ready')"
