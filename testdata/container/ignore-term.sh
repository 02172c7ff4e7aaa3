#!/bin/sh
# Says so when it gets SIGTERM, and goes on: only SIGKILL ends it.
trap 'echo "{\"type\":\"term.ignored\"}"' TERM
echo '{"type":"ready"}'
while :; do sleep 1; done
