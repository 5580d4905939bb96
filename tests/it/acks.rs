//! The worker's coalesced acks on a real quorum queue: consecutive committed
//! deliveries go out as one frame, and no frame ever settles a delivery
//! still running or handed back.

use std::time::Duration;

use futures::StreamExt;
use ward_worker::acks::Acks;
use ward_worker::metrics::Metrics;

use crate::sandbox::amqp_url;

async fn next_body(inbox: &mut ward_broker::Inbox) -> Option<(String, ward_broker::Delivery)> {
    let delivery = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .ok()??
        .unwrap();
    Some((
        String::from_utf8(delivery.body().to_vec()).unwrap(),
        delivery,
    ))
}

fn frames(metrics: &Metrics, kind: &str) -> u64 {
    metrics.ack_frames_total.with_label_values(&[kind]).get()
}

#[tokio::test]
async fn acks_coalesce_only_committed_deliveries() {
    let settings = ward_broker::Settings {
        url: amqp_url(),
        queue_prefix: format!("acks-{}.", uuid::Uuid::now_v7().simple()),
        delivery_limit: 20,
    };
    let tiers = vec!["t".to_owned()];
    let broker = ward_broker::Broker::connect(&settings).await.unwrap();
    broker.declare(&tiers).await.unwrap();
    for body in ["1", "2", "3", "4", "5", "6"] {
        // A new quorum queue nacks until its leader is elected.
        let mut published = false;
        for _ in 0..50 {
            if broker.publish_raw("t", body.as_bytes()).await.is_ok() {
                published = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(published, "the broker never confirmed message {body}");
    }

    let mut inbox = broker.consume("t", 10, "acks-test").await.unwrap();
    let metrics = Metrics::new();
    let acks = Acks::new(inbox.settle(), metrics.clone());
    let mut handles = Vec::new();
    for expected in ["1", "2", "3", "4", "5", "6"] {
        let (body, delivery) = next_body(&mut inbox).await.expect("six deliveries");
        assert_eq!(body, expected, "deliveries come in publish order");
        handles.push(acks.received(delivery.tag()));
    }

    // 1, 2 and 3 commit together: one frame acks them.
    let (one, two, three) = tokio::join!(handles[0].ack(), handles[1].ack(), handles[2].ack());
    one.unwrap();
    two.unwrap();
    three.unwrap();
    assert_eq!(
        (frames(&metrics, "run"), frames(&metrics, "single")),
        (1, 0)
    );

    // 5 commits while 4 still runs: acked alone, at once.
    tokio::time::timeout(Duration::from_secs(5), handles[4].ack())
        .await
        .expect("a delivery behind a running one is not held back")
        .unwrap();
    assert_eq!(
        (frames(&metrics, "run"), frames(&metrics, "single")),
        (1, 1)
    );

    // 4 is handed back; 6 never settles before the channel closes.
    handles[3].nack(true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        (frames(&metrics, "run"), frames(&metrics, "single")),
        (1, 1),
        "a hand-back sends no ack"
    );
    inbox.close().await;
    drop(acks);
    // Its channel gone, a late ack (or nack) is refused at once, not left
    // waiting for a flush that never comes.
    let late = tokio::time::timeout(Duration::from_secs(2), handles[5].ack())
        .await
        .expect("an ack after its channel's Acks went is answered at once");
    assert!(late.is_err(), "a late ack cannot have been sent");
    assert!(handles[5].nack(true).await.is_err());
    // A settled tag is never settled again (that would close the channel).
    assert!(handles[0].nack(true).await.is_err());

    // Only 4 (handed back) and 6 (unsettled) come back: no frame covered them.
    let mut again = broker.consume("t", 10, "acks-test-again").await.unwrap();
    let mut bodies = Vec::new();
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(1_500), again.next()).await
    {
        bodies.push(String::from_utf8(delivery.body().to_vec()).unwrap());
        delivery.ack().await.unwrap();
    }
    bodies.sort();
    assert_eq!(bodies, ["4", "6"]);
    again.close().await;
    broker.delete(&tiers).await.unwrap();
    broker.close().await;
}
