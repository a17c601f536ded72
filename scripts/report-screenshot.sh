#!/usr/bin/env bash
# Regenerate docs/img/report.png, the `fleet report` screenshot in the README:
#   1. `fleet demo` on embedded Postgres and Redis in a throwaway FLEET_STATE_DIR,
#      over a backlog of the bundled sample conversations, the shipped intent set
#      (as one-message conversations) and a few malformed records that fail;
#      with espeak-ng it also transcribes spoken samples (transcribe -> audio_intent)
#   2. `fleet report --run 1` (the fresh state folder holds that one run)
#   3. headless Chromium renders the page to a PNG
# Prepared models are reused from FLEET_MODELS_DIR (default: the usual
# ~/.local/share/fleet/models); the first run trains the intent model there.
# Needs ./scripts/install.sh (chromium included). Usage: scripts/report-screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-docs/img/report.png}
FLEET=${FLEET:-.venv/bin/fleet}
PY=${PY:-.venv/bin/python}
CHROMIUM=${CHROMIUM:-chromium}
SIZE=${SIZE:-1280,1900}
command -v "$CHROMIUM" >/dev/null || { echo "chromium not found: run ./scripts/install.sh" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fleet-report-shot.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
unset DATABASE_URL BROKER_URL FLEET_CONFIG_FILE FLEET_AUDIO_ROOT
export FLEET_STATE_DIR="$WORK/state"
export FLEET_MODELS_DIR=${FLEET_MODELS_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/fleet/models}

"$PY" - "$WORK/backlog.jsonl" <<'EOF'
import json, sys
from config.data import data_path

data = data_path(".")
with open(sys.argv[1], "w") as out:
    out.write(data.joinpath("sample_conversations.jsonl").read_text())
    for i, line in enumerate(data.joinpath("intent.jsonl").read_text().splitlines()):
        row = json.loads(line)
        msg = [{"role": "user", "content": row["text"]}]
        out.write(json.dumps({"external_id": f"set-{i:04d}", "messages": msg, "language": "en"}) + "\n")
    bad = [[], [{"role": "user", "content": ""}], [{"content": "no role here"}],
           [{"role": "user", "content": ["not", "a", "string"]}], []]
    for i, msg in enumerate(bad):
        out.write(json.dumps({"external_id": f"broken-{i}", "messages": msg}) + "\n")
EOF

"$FLEET" demo --conversations "$WORK/backlog.jsonl" > "$WORK/demo.log" 2>&1 \
  || { tail -30 "$WORK/demo.log" >&2; echo "fleet demo failed (log above)" >&2; exit 1; }
grep -E "^(intent|transcribe|audio_intent):|demo took" "$WORK/demo.log" || true
"$FLEET" report --run 1 --out "$WORK/report.html"

mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$WORK/chromium" --screenshot="$(realpath -m "$OUT")" \
  --window-size="$SIZE" "file://$WORK/report.html" >/dev/null 2>&1
echo "wrote $OUT ($(du -k "$OUT" | cut -f1) KB)"
