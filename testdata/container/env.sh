#!/bin/sh
# Reports what of the environment an agent sees: the AGENTSTREAM_ variables
# other than the two the container sets for it, and a few test variables.
leaked=$(env | cut -d= -f1 | grep '^AGENTSTREAM_' | grep -v -e '^AGENTSTREAM_AGENT_ID$' -e '^AGENTSTREAM_RUN$' | sort | tr '\n' ' ')
echo "{\"type\":\"env\",\"data\":{\"leaked\":\"$leaked\",\"tool\":\"${MY_TOOL_KEY:-}\",\"allowed\":\"${MY_ALLOWED:-}\",\"path\":\"${PATH:+set}\",\"agent\":\"${AGENTSTREAM_AGENT_ID:-}\"}}"
