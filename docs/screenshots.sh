#!/usr/bin/env bash
# Refresh the single pane's screenshots (docs/pane.png, docs/pane-service.png) from its
# browser test (tests/pane.rs: a live mesh on loopback, Debian's chromium; .ci/setup
# installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
TRELLIS_SCREENSHOTS="$PWD/docs" cargo test -p trellis --test pane -- --nocapture
