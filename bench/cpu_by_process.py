#!/usr/bin/env python3
"""bench/cpu_by_process.py SECONDS — CPU cores used per process name over SECONDS.

Reads /proc/<pid>/stat twice and prints, busiest first, the cores each command
name used in between (every postgres backend counted as `postgres`).
Standard library only.
"""
import collections
import os
import sys
import time


def snapshot():
    ticks = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks[pid] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    hertz = os.sysconf("SC_CLK_TCK")
    before = snapshot()
    time.sleep(seconds)
    after = snapshot()
    cores = collections.Counter()
    for pid, (name, ticks) in after.items():
        key = "postgres" if name.startswith("postgres") else name
        cores[key] += (ticks - before.get(pid, (name, 0))[1]) / hertz / seconds
    for name, used in cores.most_common(8):
        print(f"{name:24s} {used:5.2f} cores")


if __name__ == "__main__":
    main()
