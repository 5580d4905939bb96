//! `wardctl` against a running master: tenant create, definition publish,
//! instance start (and wait), instance show, and its error output.

use std::time::Duration;

use serde_json::Value;
use ward_worker::Registry;

use crate::sandbox::{ADMIN_TOKEN, Sandbox, binary_path};

async fn wardctl(url: &str, key: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(binary_path("wardctl"));
    command
        .env_clear()
        .env("WARD_URL", url)
        .env("WARD_ADMIN_TOKEN", ADMIN_TOKEN)
        .args(args);
    if let Some(key) = key {
        command.env("WARD_API_KEY", key);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn wardctl_drives_the_whole_path() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);

    let (ok, stdout, stderr) = wardctl(
        &url,
        None,
        &["tenant", "create", "--slug", "cli-home", "--tier", "silver"],
    )
    .await;
    assert!(ok, "{stderr}");
    let tenant: Value = serde_json::from_str(&stdout).unwrap();
    let key = tenant["api_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("ward_"));

    let file = std::env::temp_dir().join(format!("{}-definition.json", sandbox.id));
    std::fs::write(&file, include_str!("../../examples/vitals-check.json")).unwrap();
    let (ok, stdout, stderr) = wardctl(
        &url,
        Some(&key),
        &["definition", "publish", file.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{stderr}");
    let published: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(published["version"], 1);

    let input = r#"{"patient":"p-17","heart_rate":72,"respiratory_rate":14,"spo2":98}"#;
    let (ok, stdout, stderr) = wardctl(
        &url,
        Some(&key),
        &[
            "instance",
            "start",
            "--definition",
            "vitals-check",
            "--input",
            input,
            "--wait",
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let finished: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(finished["output"]["risk"], "low");

    let id = finished["id"].as_str().unwrap();
    let (ok, stdout, stderr) = wardctl(&url, Some(&key), &["instance", "show", id]).await;
    assert!(ok, "{stderr}");
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown, finished);

    std::fs::write(
        &file,
        r#"{"name": "broken", "steps": [{"id": "a", "kind": "task"}]}"#,
    )
    .unwrap();
    let (ok, _stdout, stderr) = wardctl(
        &url,
        Some(&key),
        &["definition", "publish", file.to_str().unwrap()],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("422"), "{stderr}");
    assert!(
        stderr.contains("steps[0].handler: a task step needs `handler`"),
        "{stderr}"
    );

    let (ok, _stdout, stderr) = wardctl(&url, None, &["instance", "show", id]).await;
    assert!(!ok);
    assert!(stderr.contains("WARD_API_KEY"), "{stderr}");
    let _ = std::fs::remove_file(&file);
    sandbox.teardown().await;
}
