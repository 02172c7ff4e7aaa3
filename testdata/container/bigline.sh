#!/bin/sh
# One 2 MiB line, then a short one.
head -c 2097152 /dev/zero | tr '\0' 'x'
echo
echo after
