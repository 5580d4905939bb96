//! Leader election and fencing: a standby master process takes over dispatch
//! after the leader is killed (-9) or stopped (SIGTERM), and a stale epoch
//! can write nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use ward_shared::wire::StartInstance;
use ward_worker::Registry;

use crate::sandbox::{LEASE_TTL_S, Sandbox, sequential, wait_ready};

const LEASE: ward_store::Lease = ward_store::Lease {
    default_ms: 60_000,
    grace_ms: 10_000,
    publish_ms: 5_000,
};

/// Polls the masters' `/readyz` until exactly one reports leading; returns its index.
async fn wait_for_leader(sandbox: &Sandbox, urls: &[&str], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let mut leaders = Vec::new();
        for (index, url) in urls.iter().enumerate() {
            if let Ok(response) = sandbox.http.get(format!("{url}/readyz")).send().await {
                if let Ok(body) = response.json::<serde_json::Value>().await {
                    if body["leader"] == true {
                        leaders.push(index);
                    }
                }
            }
        }
        if leaders.len() == 1 {
            return leaders[0];
        }
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        assert!(Instant::now() < deadline, "no leader after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

async fn wait_exit(sandbox: &mut Sandbox, pid: u32, timeout: Duration) -> std::process::ExitStatus {
    let child = sandbox
        .children
        .iter_mut()
        .find(|child| child.id() == Some(pid))
        .expect("child");
    tokio::time::timeout(timeout, child.wait())
        .await
        .expect("process exits before the deadline")
        .unwrap()
}

#[tokio::test]
async fn standby_master_takes_over_after_kill_and_sigterm() {
    let mut sandbox = Sandbox::new().await;
    let (url_a, pid_a) = sandbox.spawn("ward-master", &[]);
    let (url_b, pid_b) = sandbox.spawn("ward-master", &[]);
    sandbox
        .wait_processes_ready(&[&url_a, &url_b], Duration::from_secs(30))
        .await;
    sandbox.start_worker(Registry::builtin()).await;
    let urls = [url_a.as_str(), url_b.as_str()];
    let pids = [pid_a, pid_b];
    let leader = wait_for_leader(&sandbox, &urls, Duration::from_secs(15)).await;
    let standby = 1 - leader;
    let key = sandbox.tenant(urls[standby], "failover", "gold").await;
    sandbox
        .publish(urls[standby], &key, &sequential("check", &["echo", "noop"]))
        .await;
    let id = sandbox
        .start_instance(urls[standby], &key, &json!({ "definition": "check" }))
        .await;
    let instance = sandbox
        .wait_finished(urls[standby], &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed");

    // kill -9 the leader: the standby leads within the lease TTL plus a few seconds.
    let killed_at = Instant::now();
    signal(pids[leader], "KILL");
    let new_leader =
        wait_for_leader(&sandbox, &urls[standby..=standby], Duration::from_secs(15)).await;
    assert_eq!(new_leader, 0);
    let failover_kill = killed_at.elapsed();
    println!(
        "failover after kill -9 of the leader: {:.2} s (lease TTL {LEASE_TTL_S} s)",
        failover_kill.as_secs_f64()
    );
    assert!(failover_kill < Duration::from_secs(LEASE_TTL_S.unsigned_abs() + 5));
    let id = sandbox
        .start_instance(urls[standby], &key, &json!({ "definition": "check" }))
        .await;
    let instance = sandbox
        .wait_finished(urls[standby], &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed", "the new leader dispatches");

    // SIGTERM the new leader: it resigns, so a fresh standby leads at once.
    let (url_c, _pid_c) = sandbox.spawn("ward-master", &[]);
    wait_ready(
        &sandbox.http,
        &format!("{url_c}/readyz"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let stopped_at = Instant::now();
    signal(pids[standby], "TERM");
    let leader_c = wait_for_leader(&sandbox, &[url_c.as_str()], Duration::from_secs(15)).await;
    assert_eq!(leader_c, 0);
    let failover_term = stopped_at.elapsed();
    println!(
        "failover after SIGTERM of the leader: {:.2} s",
        failover_term.as_secs_f64()
    );
    assert!(failover_term < Duration::from_secs(LEASE_TTL_S.unsigned_abs() + 5));
    let status = wait_exit(&mut sandbox, pids[standby], Duration::from_secs(10)).await;
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    let id = sandbox
        .start_instance(&url_c, &key, &json!({ "definition": "check" }))
        .await;
    let instance = sandbox
        .wait_finished(&url_c, &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed");

    let sql = sandbox.sql().await;
    let epochs: i64 = sql
        .query_one("SELECT count(DISTINCT dispatch_epoch) FROM task_runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        epochs, 3,
        "each of the three leadership terms dispatched under its own epoch"
    );
    sandbox.teardown().await;
}

/// A new tenant with `definition`, one `echo` step, published through the store.
async fn tenant_with_one_step(
    store: &ward_store::Store,
    slug: &str,
    definition: &str,
) -> ward_store::Tenant {
    let tenant = store
        .create_tenant(slug, "gold", ward_store::Quotas::default())
        .await
        .unwrap()
        .tenant;
    let parsed = ward_shared::Definition::from_json(
        serde_json::to_string(&sequential(definition, &["echo"]))
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    store.publish_definition(&tenant, &parsed).await.unwrap();
    tenant
}

#[tokio::test]
async fn a_stale_epoch_can_write_nothing() {
    let sandbox = Sandbox::new().await;
    let store = sandbox.store().await;
    let tenant = tenant_with_one_step(&store, "fenced", "fence").await;
    let start = |business_key: &str| StartInstance {
        definition: "fence".into(),
        version: None,
        input: json!({}),
        business_key: Some(business_key.into()),
        trace_parent: None,
    };
    store
        .start_instance(&tenant, &start("first"), None)
        .await
        .unwrap();

    let old_epoch = store.claim_epoch(100, 7, "old-leader").await.unwrap();
    // The old leader is mid-dispatch (think: paused) while a new leader is elected.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let old_store = store.clone();
    let old_dispatch = tokio::spawn(async move {
        old_store
            .dispatch_ready(old_epoch, LEASE, 10, |tasks| async move {
                let _ = released.await;
                assert_eq!(tasks.len(), 1);
                Ok::<_, std::io::Error>(())
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let new_store = store.clone();
    let claim = tokio::spawn(async move { new_store.claim_epoch(101, 7, "new-leader").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !claim.is_finished(),
        "the new epoch waits for the old leader's in-flight transaction"
    );
    release.send(()).unwrap();
    assert_eq!(
        old_dispatch.await.unwrap().unwrap(),
        1,
        "the transaction that held the fence commits"
    );
    let new_epoch = claim.await.unwrap().unwrap();
    assert!(new_epoch > old_epoch);

    // From now on the old epoch writes nothing, and never reaches the broker.
    store
        .start_instance(&tenant, &start("second"), None)
        .await
        .unwrap();
    let published = Arc::new(AtomicBool::new(false));
    let flag = published.clone();
    let result = store
        .dispatch_ready(old_epoch, LEASE, 10, |_tasks| async move {
            flag.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        })
        .await;
    assert!(
        matches!(
            result,
            Err(ward_store::Error::Fenced { epoch, epoch_current }) if epoch == old_epoch && epoch_current == new_epoch
        ),
        "{result:?}"
    );
    assert!(
        !published.load(Ordering::SeqCst),
        "a fenced leader publishes nothing"
    );
    assert!(matches!(
        store.claim_epoch(100, 7, "old-leader").await,
        Err(ward_store::Error::Fenced { .. })
    ));
    assert!(matches!(
        store.claim_epoch(101, 7, "another").await,
        Err(ward_store::Error::Fenced { .. })
    ));
    let sql = sandbox.sql().await;
    let states: Vec<(String, Option<i64>)> = sql
        .query(
            "SELECT state, dispatch_epoch FROM task_runs ORDER BY created_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        states,
        [
            ("dispatched".to_owned(), Some(old_epoch)),
            ("ready".to_owned(), None)
        ]
    );
    assert_eq!(
        store
            .dispatch_ready(new_epoch, LEASE, 10, |_| async {
                Ok::<_, std::io::Error>(())
            })
            .await
            .unwrap(),
        1
    );
    // etcd rebuilt from scratch: its revisions start over, and its leader
    // still gets a newer epoch; the old term is fenced.
    let rebuilt_epoch = store.claim_epoch(3, 8, "after-etcd-rebuild").await.unwrap();
    assert!(rebuilt_epoch > new_epoch);
    assert!(matches!(
        store
            .dispatch_ready(new_epoch, LEASE, 10, |_| async {
                Ok::<_, std::io::Error>(())
            })
            .await,
        Err(ward_store::Error::Fenced { .. })
    ));
    sandbox.teardown().await;
}

/// A dispatch transaction that fails after its claim (the broker refused
/// the batch) rolls back when it is dropped: its runs can be claimed again
/// at once, not only after the server's idle bound ends the session, and
/// the connection goes back to the pool usable.
#[tokio::test]
async fn a_failed_dispatch_releases_its_claim_at_once() {
    let sandbox = Sandbox::new().await;
    let store = sandbox.store().await;
    let tenant = tenant_with_one_step(&store, "refused", "refused").await;
    let request = StartInstance {
        definition: "refused".into(),
        version: None,
        input: json!({}),
        business_key: None,
        trace_parent: None,
    };
    store.start_instance(&tenant, &request, None).await.unwrap();
    let epoch = store.claim_epoch(200, 9, "leader").await.unwrap();
    let refused = store
        .dispatch_ready(epoch, LEASE, 10, |tasks| async move {
            assert_eq!(tasks.len(), 1);
            Err::<(), _>(std::io::Error::other("broker refused the batch"))
        })
        .await;
    assert!(
        matches!(refused, Err(ward_store::Error::Publish(_))),
        "{refused:?}"
    );
    // The claim's row lock is gone well within the dispatch transaction's
    // idle bound (publish_ms + 500 ms): a session of our own locks the
    // run without waiting.
    let mut sql = sandbox.sql().await;
    let deadline = Instant::now() + Duration::from_millis(1_000);
    loop {
        let transaction = sql.transaction().await.unwrap();
        let locked = transaction
            .query("SELECT state FROM task_runs FOR UPDATE NOWAIT", &[])
            .await;
        // Waited for: a dropped transaction's ROLLBACK is not, and its lock
        // would make the claim below skip the run.
        transaction.rollback().await.unwrap();
        match locked {
            Ok(rows) => {
                assert_eq!(rows.len(), 1);
                assert_eq!(rows[0].get::<_, String>(0), "ready");
                break;
            }
            Err(error) => assert!(
                Instant::now() < deadline,
                "the failed dispatch still holds its claim: {error:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pool's connections are usable, and the run is dispatched once.
    assert_eq!(
        store
            .dispatch_ready(epoch, LEASE, 10, |_| async { Ok::<_, std::io::Error>(()) })
            .await
            .unwrap(),
        1
    );
    let states: Vec<String> = sql
        .query("SELECT state FROM task_runs", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(states, ["dispatched"]);
    sandbox.teardown().await;
}
