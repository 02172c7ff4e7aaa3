#!/bin/sh
# Writes $1 events numbered 1..$1, one every $2 seconds (default 0.01),
# with a plain line after every tenth.
i=1
while [ "$i" -le "$1" ]; do
	echo "{\"type\":\"step\",\"data\":{\"n\":$i}}"
	if [ $((i % 10)) -eq 0 ]; then echo "done $i"; fi
	sleep "${2:-0.01}"
	i=$((i + 1))
done
