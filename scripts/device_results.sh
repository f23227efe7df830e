#!/usr/bin/env bash
# Here, after `scripts/device_reproduce.sh` calls: turn the PRESET.tgz a call brought back into a results folder.
#
#   bash scripts/device_results.sh full <files_at>/full.tgz docs/results/full
#
# Unpacks the sweep into /root/work/PRESET (the absolute path its spec and configs name; an existing one is moved
# to /root/work/PRESET.old.<time> first, never deleted), writes its report with `reproduce --report-only` (no
# training; the built-in model is prepared here once, ~1 min), and copies the result into DEST without weights
# (adapter/, model/, checkpoints/): a temporary folder beside DEST, then a rename, so DEST is never half written.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:?preset}; TGZ=${2:?the PRESET.tgz a device call brought back}; DEST=${3:?destination folder}
[ -f "$TGZ" ] || { echo "$TGZ: no such file"; exit 1; }
tar tzf "$TGZ" "$PRESET/" > /dev/null 2>&1 || { echo "$TGZ: expected a tarball of the folder $PRESET/"; exit 1; }
WORK=/root/work/$PRESET
if [ -e "$WORK" ]; then mv "$WORK" "$WORK.old.$(date +%s)"; fi
mkdir -p /root/work && tar xzf "$TGZ" -C /root/work
HF_HUB_OFFLINE=1 .venv/bin/regretless reproduce --preset "$PRESET" --out "$WORK" --report-only
TMP="$DEST.tmp.$$"
rm -rf "$TMP" && mkdir -p "$(dirname "$DEST")"
(cd "$WORK" && tar cf - --exclude=adapter --exclude=model --exclude=checkpoints --exclude=zygote.log .) \
  | (mkdir -p "$TMP" && cd "$TMP" && tar xf -)
if [ -e "$DEST" ]; then mv "$DEST" "$DEST.old.$$"; fi
mv "$TMP" "$DEST" && rm -rf "$DEST.old.$$"
echo "wrote $DEST from $TGZ"
