"""The benchmark harness of `nudgeflow bench`: throughput, latency, timer lag, memory.

    bench.cli       `bench_main(argv)`: flags, then `harness.run`, the table and the JSON
    bench.harness   the phases, in order, against the services of scripts/services.sh
    bench.flowproc  one process of the live flow (drain a topic to its end, or tail it)
    bench.ceiling   the baseline: a plain confluent-kafka loop decoding with orjson
    bench.memory    state bytes per active user (RSS delta and pickled size)
    bench.pacing    the paced producer and the latency read-out from the dispatch API log
    bench.levers    micro-measurements of the levers of issue 4 (`--levers`)
    bench.stats     medians, percentiles, the table

Every measurement that runs the flow runs it in subprocesses, so that the
numbers are those of a process that does nothing else, and the machine is
described in the JSON next to them. See bench/README.md.
"""
