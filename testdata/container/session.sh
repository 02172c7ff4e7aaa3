#!/bin/sh
# A short agent session: events, plain lines, stderr; then exit with $1.
echo '{"type":"session.started","data":{"model":"test"}}'
echo 'plain text line'
echo '{"type":"tool.call","name":"grep","args":["-n","x"]}'
echo 'warning: on stderr' >&2
echo '{"type":"Not A Type"}'
echo '["not","an","object"]'
echo "{\"type\":\"env\",\"data\":{\"x\":\"${X:-}\",\"secret\":\"${AGENTSTREAM_CONTAINER_SECRET:-}\",\"pwd\":\"$(pwd)\",\"agent\":\"${AGENTSTREAM_AGENT_ID:-}\"}}"
exit "${1:-0}"
