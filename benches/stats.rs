//! Cost of recording into a stats shard, alone and with a second writer on
//! another shard at the same time, and of one scrape (merge of 16 shards and
//! render of every family).
//!
//! Run: `cargo bench --bench stats` (figures in docs/benchmarks.md).
//! Goals: one observation at most 5 ns; two writers on two shards no more
//! than 1.5x slower each; merge and render with 16 shards under 1 ms.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use conntrack_metrics::expo::http::Format;
use conntrack_metrics::expo::scrape::{Exposition, ScrapeOptions};
use conntrack_metrics::stats::summary::SummaryWindow;
use conntrack_metrics::stats::{Counter, Registry, Series, ShardSet, ShardWriter};

const BATCH: usize = 1024;

/// Values that walk every bucket of the latency families (ns), from a fixed
/// xorshift sequence so every run records the same ones.
fn latencies() -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..BATCH)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // 1 us .. ~17 s, log-spread.
            (1_000u64 << (x % 24)) | ((x >> 40) % 1_000)
        })
        .collect()
}

fn record_batch(w: &mut ShardWriter<'_>, values: &[u64]) {
    for &v in values {
        w.observe(Series::SeenReplyLatency, black_box(v));
    }
}

/// Runs `iters` batches on `writers` shards at once, one thread each, and
/// returns the time the first writer took (all start together).
fn concurrent(set: &Arc<ShardSet>, writers: usize, iters: u64, values: &Arc<Vec<u64>>) -> Duration {
    let barrier = Arc::new(Barrier::new(writers));
    let others: Vec<_> = (1..writers)
        .map(|i| {
            let (set, barrier, values) =
                (Arc::clone(set), Arc::clone(&barrier), Arc::clone(values));
            std::thread::spawn(move || {
                let mut w = set.writer(i).unwrap();
                barrier.wait();
                for _ in 0..iters {
                    record_batch(&mut w, &values);
                }
            })
        })
        .collect();
    let mut w = set.writer(0).unwrap();
    barrier.wait();
    let start = Instant::now();
    for _ in 0..iters {
        record_batch(&mut w, values);
    }
    let took = start.elapsed();
    drop(w);
    for t in others {
        t.join().unwrap();
    }
    took
}

fn observe(c: &mut Criterion) {
    let values = Arc::new(latencies());
    let set = Arc::new(ShardSet::new(2, SummaryWindow::from_minutes(10)));
    let mut g = c.benchmark_group("observe");
    g.throughput(Throughput::Elements(BATCH as u64));
    {
        let mut w = set.writer(0).unwrap();
        g.bench_function("histogram only (bytes)", |b| {
            b.iter(|| {
                for &v in values.iter() {
                    w.observe(Series::BytesToService, black_box(v % 200_000));
                }
            })
        });
        g.bench_function("histogram + window quantiles (latency)", |b| {
            b.iter(|| record_batch(&mut w, &values))
        });
        g.bench_function("counter", |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    w.count(black_box(Counter::EventsUpdate), 1);
                }
            })
        });
    }
    // Same work measured the same way (threads, barrier), one writer vs two.
    g.bench_function("latency, 1 writer (threaded harness)", |b| {
        b.iter_custom(|iters| concurrent(&set, 1, iters, &values))
    });
    g.bench_function("latency, 2 writers on 2 shards", |b| {
        b.iter_custom(|iters| concurrent(&set, 2, iters, &values))
    });
    g.finish();
}

fn scrape(c: &mut Criterion) {
    let values = latencies();
    let registry = Arc::new(Registry::new(ShardSet::new(
        16,
        SummaryWindow::from_minutes(10),
    )));
    let set = registry.shards();
    for i in 0..16 {
        let mut w = set.writer(i).unwrap();
        for s in Series::ALL {
            for &v in &values {
                w.observe(s, v / 1000);
                w.observe(s, v);
            }
        }
        for counter in Counter::ALL {
            w.count(counter, 1);
        }
    }
    let options = ScrapeOptions {
        node: "node-1".into(),
        legacy_names: false,
        awaiting_reply: false,
    };
    let mut exposition = Exposition::new(Arc::clone(&registry), options);
    let mut out = Vec::with_capacity(64 << 10);
    let mut g = c.benchmark_group("scrape");
    g.bench_function("merge 16 shards + render (Prometheus text)", |b| {
        b.iter(|| {
            out.clear();
            exposition.render(Format::Prometheus, &mut out);
            black_box(&out);
        })
    });
    g.bench_function("merge 16 shards + render (OpenMetrics)", |b| {
        b.iter(|| {
            out.clear();
            exposition.render(Format::OpenMetrics, &mut out);
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = observe, scrape
}
criterion_main!(benches);
