//! librdkafka's in-process mock cluster as a broker on a loopback port, for
//! trying by hand what the tansu broker cannot show: tansu 0.6 keeps a
//! member killed without leaving in its group (and its partitions with it),
//! so a `kill -9` takeover needs a broker that expires sessions, as Kafka
//! does and this mock does.
//!
//! `cargo run --example mock_broker -- PARTITIONS TOPIC...` creates each
//! topic with PARTITIONS partitions, prints the bootstrap address and runs
//! until interrupted.

use rdkafka::mocking::MockCluster;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [partitions, topics @ ..] = args.as_slice() else {
        eprintln!("usage: mock_broker PARTITIONS TOPIC...");
        std::process::exit(2);
    };
    let partitions: i32 = partitions.parse()?;
    let mock = MockCluster::new(1)?;
    for topic in topics {
        mock.create_topic(topic, partitions, 1)?;
    }
    println!("{}", mock.bootstrap_servers());
    loop {
        std::thread::park();
    }
}
