//! Tenant isolation in Postgres: row-level security binds the application
//! role, which is not the tables' owner, not a superuser and cannot bypass
//! it; the tenant is set per transaction and never outlives it.

use serde_json::json;

use crate::sandbox::{Sandbox, admin_sql, database_url};

#[tokio::test]
async fn row_level_security_binds_the_application_role() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key_a = sandbox.tenant(&url, "hospital-a", "gold").await;
    let key_b = sandbox.tenant(&url, "hospital-b", "gold").await;
    for key in [&key_a, &key_b] {
        sandbox
            .publish_yaml(
                &url,
                key,
                "name: admit\nsteps:\n  - { id: a, kind: delay, duration_ms: 60000 }\n",
            )
            .await;
        sandbox
            .start_instance(&url, key, &json!({ "definition": "admit" }))
            .await;
    }

    let admin = admin_sql().await;
    let role = admin
        .query_one(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'ward_app'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (role.get::<_, bool>(0), role.get::<_, bool>(1)),
        (false, false)
    );
    let schema = sandbox.schema();
    for table in [
        "tenants",
        "api_keys",
        "definitions",
        "instances",
        "task_runs",
        "signals",
        "schedules",
    ] {
        let row = admin
            .query_one(
                "SELECT c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, bool>(0), row.get::<_, bool>(1)),
            (true, true),
            "{table}: RLS enabled and forced"
        );
        assert_ne!(
            row.get::<_, String>(2),
            "ward_app",
            "{table}: the application role does not own it"
        );
    }

    // One connection, as the application role.
    let mut config: tokio_postgres::Config = database_url().parse().unwrap();
    config.options(format!("-c search_path={schema}"));
    let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("SET ROLE ward_app").await.unwrap();
    let tenant_a: uuid::Uuid = admin
        .query_one(
            &format!("SELECT id FROM {schema}.tenants WHERE slug = 'hospital-a'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let transaction = client.transaction().await.unwrap();
    transaction
        .execute(
            "SELECT set_config('ward.tenant_id', $1, true)",
            &[&tenant_a.to_string()],
        )
        .await
        .unwrap();
    for table in ["tenants", "definitions", "instances", "task_runs"] {
        let visible: i64 = transaction
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(visible, 1, "{table}: tenant A sees only its own row");
    }
    let foreign = transaction
        .execute(
            "UPDATE instances SET status = 'cancelled' WHERE tenant_id <> $1",
            &[&tenant_a],
        )
        .await
        .unwrap();
    assert_eq!(foreign, 0, "tenant A cannot touch tenant B's rows");
    let smuggled = transaction
        .execute(
            "INSERT INTO signals (id, tenant_id, instance_id, name, payload) \
             SELECT gen_random_uuid(), t.id, i.id, 'x', '{}' FROM tenants t, instances i WHERE t.id <> $1",
            &[&tenant_a],
        )
        .await
        .unwrap();
    assert_eq!(smuggled, 0);
    transaction.commit().await.unwrap();

    // The setting ended with the transaction: the same connection now sees nothing.
    let unset: i64 = client
        .query_one("SELECT count(*) FROM instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unset, 0, "no tenant set, no rows");
    sandbox.teardown().await;
}
