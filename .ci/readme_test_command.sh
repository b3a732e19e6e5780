#!/usr/bin/env bash
# Print the test command that README.md holds between the marker comments
#   <!-- test-command -->  ...  <!-- /test-command -->
# (one command line, optionally inside a ``` fence). Fails loudly when the markers or
# the command are missing or ambiguous, so CI never runs an empty or wrong command.
set -euo pipefail

readme="${1:-README.md}"
[[ -f "$readme" ]] || { echo "readme_test_command: $readme not found" >&2; exit 1; }

opens=$(grep -c '<!-- test-command -->' "$readme" || true)
closes=$(grep -c '<!-- /test-command -->' "$readme" || true)
if [[ "$opens" != 1 || "$closes" != 1 ]]; then
    echo "readme_test_command: $readme needs exactly one '<!-- test-command -->' and one '<!-- /test-command -->' (found $opens and $closes)" >&2
    exit 1
fi

# Lines strictly between the markers, minus code fences and blank lines; a leading "$ " prompt is dropped.
command=$(awk '
    /<!-- \/test-command -->/ { inside = 0 }
    inside && !/^[[:space:]]*(```|~~~)/ && NF { sub(/^[[:space:]]*\$[[:space:]]+/, ""); print }
    /<!-- test-command -->/ { inside = 1 }
' "$readme")

lines=$(printf '%s' "$command" | grep -c . || true)
if [[ "$lines" != 1 ]]; then
    echo "readme_test_command: expected one command line between the markers in $readme, found $lines:" >&2
    printf '%s\n' "$command" >&2
    exit 1
fi
printf '%s\n' "$command"
