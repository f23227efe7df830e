#!/usr/bin/env bash
# `regretless reproduce --preset PRESET` on a lent GPU machine that reaches no network, over several calls of at most
# 10 minutes each (the sweep ledger resumes). Run from the repository root on that machine:
#
#   bash scripts/device_reproduce.sh stash                 # calls 1, 2: keep the GGUF part carried in /root/stash
#   bash scripts/device_reproduce.sh run full 480 12 4     # later calls: run for 480 s (12 SFT, 4 RL workers)
#   FRESH=1 bash scripts/device_reproduce.sh run full ...  # first run call of a sweep started from nothing
#
# Here, first: `bash scripts/device_prepare.sh` (builds the ignored .devcache/ and .whl/ those calls carry).
# Why the parts: the built-in SmolLM2-135M comes from a 98 MB GGUF file, over the 64 MiB one call carries; the
# machine keeps /root and /tmp while it stays warm between calls, so the first part travels with the wheels in a
# stash call (carry .devcache/p1 and .whl: they install into /tmp/site), the second in another (carry
# .devcache/p2), the third (.devcache/p3/gguf.part3, with gguf.sha256) in the first run call (carry .devcache/p3).
# The sweep folder is /root/work/PRESET on every machine (the same absolute paths in its spec and configs, so a
# copy brought back continues here or there); a fresh machine starts from FROM=<folder or PRESET.tgz> when given
# (a sweep in progress, committed as the $OUT/PRESET.tgz a call brought back, to continue in a later session: a
# tarball of ~1 MB, where its folder and data would take 5 MB of the 64 MiB a call carries), else runs/PRESET when
# a call carries it, else the committed docs/results/PRESET (which travels with the tree).
# Back here: `bash scripts/device_results.sh PRESET <files_at>/PRESET.tgz docs/results/PRESET` (unpacks it into
# /root/work/PRESET, writes the report with --report-only, copies it without weights).
# SFT and RL searches run as two `reproduce --only` processes side by side (their sweep folders differ); when
# both finish, one more `reproduce` (no new runs) writes the whole report. What comes back: $OUT/PRESET.tgz (run
# folders without weights), logs, nvidia-smi utilisation.
set -uo pipefail
START=$(date +%s)
MODE=${1:?stash or run}
GGUF=/root/.cache/regretless/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 REGRETLESS_WARM=${REGRETLESS_WARM:-0}

if [ "$MODE" = stash ]; then
  mkdir -p /root/stash && cp .devcache/p*/gguf.part* /root/stash/ && ls -la /root/stash
  exit $?
fi

PRESET=${2:?preset}; SECS=${3:?seconds}; WS=${4:-12}; WR=${5:-4}
DIR=/root/work/$PRESET
if [ ! -f "$GGUF" ]; then
  [ -f /root/stash/gguf.part1 ] && [ -f /root/stash/gguf.part2 ] \
    || { echo "no /root/stash/gguf.part1 and part2: the machine is not the one of the stash calls"; exit 1; }
  mkdir -p "$(dirname "$GGUF")"
  cat /root/stash/gguf.part1 /root/stash/gguf.part2 .devcache/p3/gguf.part3 > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"
  (cd "$(dirname "$GGUF")" && sha256sum "$GGUF" | cut -d' ' -f1 | cmp - <(cut -d' ' -f1 "$OLDPWD/.devcache/p3/gguf.sha256")) \
    || { echo "GGUF checksum mismatch"; rm -f "$GGUF"; exit 1; }
fi
python3 -m regretless assets prepare smollm2-135m 2>&1 | tail -1
if [ ! -d "$DIR" ] && [ "${FRESH:-0}" != 1 ]; then  # FRESH=1: a new sweep from nothing (to time the preset)
  SRC=${FROM:-runs/$PRESET}; [ -e "$SRC" ] || SRC=docs/results/$PRESET
  mkdir -p /root/work
  case "$SRC" in
    *.tgz) tar xzf "$SRC" -C /root/work || exit 1 ;;  # a sweep's $OUT/PRESET.tgz, committed to resume it later
    *) [ -d "$SRC" ] && cp -a "$SRC" "$DIR" ;;
  esac
fi
# The call's limit (CALL_S, 600 s by default) kills everything at once, so the sweep stops 75 s before it (40 s
# to stop, 35 s to pack) and the folder is packed every minute meanwhile: a call cut short still brings back
# every run that finished (a run folder caught half-written runs again on the next call).
pack() {
  tar czf "$OUT/$PRESET.tgz.tmp" -C /root/work --exclude=adapter --exclude=model --exclude=checkpoints "$PRESET" \
    && mv "$OUT/$PRESET.tgz.tmp" "$OUT/$PRESET.tgz"
}
LEFT=$(( ${CALL_S:-600} - ($(date +%s) - START) - 75 ))
if [ "$SECS" -gt "$LEFT" ]; then
  echo "running $LEFT s, not $SECS: the call's ${CALL_S:-600} s must leave time to stop and pack"; SECS=$LEFT
fi
( while sleep 60; do pack; done ) &
PACKER=$!
nvidia-smi dmon -s um -d 5 > "$OUT/dmon.log" 2>&1 &
DMON=$!
T0=$(date +%s)
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done; }  # when each round began
timeout -k 40 -s TERM "$SECS" python3 -m regretless reproduce --preset "$PRESET" --out "$DIR" --only rl \
  --workers "$WR" 2>&1 | stamp > "$OUT/rl.log" &
RL=$!
timeout -k 40 -s TERM "$SECS" python3 -m regretless reproduce --preset "$PRESET" --out "$DIR" \
  --only capacity,lr_ratio,batch,placement --workers "$WS" 2>&1 | stamp > "$OUT/sft.log" &
SFT=$!
wait $RL; RC_RL=$?
wait $SFT; RC_SFT=$?
echo "rl exit $RC_RL, sft exit $RC_SFT after $(( $(date +%s) - T0 )) s"
kill $PACKER 2>/dev/null; wait $PACKER 2>/dev/null
pack
REPORT_S=$(( ${CALL_S:-600} - ($(date +%s) - START) - 40 ))
if [ $RC_RL = 0 ] && [ $RC_SFT = 0 ] && [ $REPORT_S -gt 20 ]; then
  timeout $REPORT_S python3 -m regretless reproduce --preset "$PRESET" --out "$DIR" > "$OUT/all.log" 2>&1
  echo "whole report: exit $?"; tail -30 "$OUT/all.log"
  pack
fi
kill $DMON 2>/dev/null
tail -n 4 "$OUT/rl.log" "$OUT/sft.log"
ls -la "$OUT"
