"""The benchmark harness of `nudgeflow bench`: throughput, latency, timer lag, memory.

    nudgeflow.bench.cli       `bench_main(argv)`: flags, then `harness.run`, the table and the JSON
    nudgeflow.bench.harness   the phases, in order, against the services of scripts/services.sh
    nudgeflow.bench.flowproc  one process of the live flow (drain a topic to its end, or tail it)
    nudgeflow.bench.ceiling   the baseline: a plain confluent-kafka loop decoding with orjson
    nudgeflow.bench.memory    state bytes per active user (RSS delta and pickled size)
    nudgeflow.bench.pacing    the paced producer and the latency read-out from the dispatch API log
    nudgeflow.bench.levers    micro-measurements of the levers of issue 4 (`--levers`)
    nudgeflow.bench.stats     medians, percentiles, the table

Every measurement that runs the flow runs it in subprocesses, so that the
numbers are those of a process that does nothing else, and the machine is
described in the JSON next to them. See bench/README.md.
"""
