#!/bin/sh
# Runs until it is stopped.
echo '{"type":"ready"}'
exec sleep 600
