#!/bin/sh
# Writes $1 events numbered 1..$1, as fast as it can.
i=1
while [ "$i" -le "$1" ]; do
	echo "{\"type\":\"step\",\"data\":{\"n\":$i}}"
	i=$((i + 1))
done
