"""The benchmark harness of `nudgeflow bench`: throughput, latency, timer lag, memory, snapshots.

    nudgeflow.bench.cli              `bench_main(argv)`: flags, `harness.run`, the table, JSON, plot
    nudgeflow.bench.harness          the phases, in order, against scripts/services.sh's services
    nudgeflow.bench.flowproc         one process of the live flow (drain a topic, capped, or tail)
    nudgeflow.bench.ceiling          `ceiling_plain`: a confluent-kafka loop decoding with orjson
    nudgeflow.bench.ceiling_bytewax  `ceiling_bytewax`: a keyed `stateful_map` counter in bytewax
    nudgeflow.bench.slow_api         the loopback API answering after a delay (`slow_api_ratio`)
    nudgeflow.bench.api_rps          the reference dispatch API's accepted triggers/s on its own
    nudgeflow.bench.memory           state bytes per active user (RSS delta and snapshot size)
    nudgeflow.bench.snapshots        snapshot time and recovery store growth per epoch, N users
    nudgeflow.bench.pacing           the paced producer and the latency read-out from the API log
    nudgeflow.bench.plot             the latency sweep as a PNG (matplotlib, optional)
    nudgeflow.bench.levers           micro-measurements of the levers of issue 4 (`--levers`)
    nudgeflow.bench.stats            medians, percentiles, the tables

Every measurement that runs the flow runs it in subprocesses, so that the
numbers are those of a process that does nothing else, and the machine is
described in the JSON next to them. See bench/README.md.
"""
