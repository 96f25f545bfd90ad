//! The database functions for writers and consumers in other languages: `exactly_claim` keeps
//! the Rust consumer's rules (key set, horizon, epoch watermark), `exactly_forget` prunes in
//! bounded batches, `exactly_enqueue` writes a relayable outbox row.

use exactly_core::IdempotencyKey;
use exactly_testkit::fresh_pg_database;

async fn migrated(url: &str) -> tokio_postgres::Client {
    let mut client = exactly_postgres::connect(url).await.expect("connect");
    exactly_postgres::migrations::migrate(&mut client)
        .await
        .expect("migrate");
    client
}

async fn claim(client: &tokio_postgres::Client, sql: &str) -> Result<bool, String> {
    client
        .query_one(sql, &[])
        .await
        .map(|row| row.get(0))
        .map_err(|e| {
            let db = e.as_db_error().expect("a database error");
            format!("{}: {}", db.code().code(), db.message())
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_claim_keeps_the_consumers_rules() {
    let url = fresh_pg_database().await;
    let client = migrated(&url).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();

    // Key-set keys: true once, then false, per consumer.
    for key in [
        IdempotencyKey::UuidV4(uuid::Uuid::new_v4()),
        IdempotencyKey::UuidV7(uuid::Uuid::now_v7()),
        IdempotencyKey::Ulid(ulid::Ulid::from_parts(now as u64, 7)),
    ] {
        let sql = format!("SELECT exactly_claim('c1', '{key}')");
        assert_eq!(claim(&client, &sql).await, Ok(true), "{key}");
        assert_eq!(claim(&client, &sql).await, Ok(false), "{key}");
        let other = format!("SELECT exactly_claim('c2', '{key}')");
        assert_eq!(claim(&client, &other).await, Ok(true), "another consumer: {key}");
    }

    // The embedded time is read as the Rust key reads it, and the horizon refuses old keys.
    let hour_ago = (now - 3_600_000) as u64;
    let ulid = IdempotencyKey::Ulid(ulid::Ulid::from_parts(hour_ago, 42));
    let v7 = {
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            hour_ago / 1000,
            (hour_ago % 1000) as u32 * 1_000_000,
        );
        IdempotencyKey::UuidV7(uuid::Uuid::new_v7(ts))
    };
    for key in [&ulid, &v7] {
        let at: i64 = client
            .query_one(&format!("SELECT exactly_key_time_ms('{key}')"), &[])
            .await
            .expect("time")
            .get(0);
        assert_eq!(Some(at), key.embedded_time().map(|t| t.0), "{key}");
        let refused = claim(
            &client,
            &format!("SELECT exactly_claim('c1', '{key}', p_horizon => interval '30 minutes')"),
        )
        .await;
        assert!(
            refused.as_ref().is_err_and(|e| e.starts_with("EXK01")),
            "{refused:?}"
        );
        assert_eq!(
            claim(&client, &format!("SELECT exactly_claim('c1', '{key}')")).await,
            Ok(true)
        );
    }

    // Sequence keys: the epoch watermark of (consumer, source, topic, partition).
    let seq = |v: u32| format!("seq:{v:032x}:pg:orders");
    let at = |v: u32, offset: i64, epoch: &str| {
        format!(
            "SELECT exactly_claim('c1', '{}', 'orders', 0, {offset}, {epoch})",
            seq(v)
        )
    };
    assert_eq!(claim(&client, &at(10, 0, "NULL")).await, Ok(true));
    assert_eq!(claim(&client, &at(10, 0, "NULL")).await, Ok(false), "a repeat");
    assert_eq!(
        claim(&client, &at(9, 1, "NULL")).await,
        Ok(false),
        "below the watermark"
    );
    assert_eq!(claim(&client, &at(11, 2, "0")).await, Ok(true));
    assert_eq!(
        claim(
            &client,
            &format!("SELECT exactly_claim('c1', '{}', 'orders', 1, 0)", seq(5))
        )
        .await,
        Ok(true),
        "another partition has its own watermark"
    );
    let regressed = claim(&client, &at(3, 3, "1")).await;
    assert!(
        regressed
            .as_ref()
            .is_err_and(|e| e.starts_with("EXK02") && e.contains("backwards")),
        "{regressed:?}"
    );
    assert_eq!(
        claim(&client, &at(12, 4, "2")).await,
        Ok(true),
        "a newer epoch above"
    );
    let stale = claim(&client, &at(13, 5, "1")).await;
    assert!(
        stale
            .as_ref()
            .is_err_and(|e| e.starts_with("EXK02") && e.contains("abandoned")),
        "{stale:?}"
    );
    let row = client
        .query_one(
            "SELECT high_key, next_offset, source_epoch FROM exactly_watermarks WHERE consumer = 'c1' AND partition = 0",
            &[],
        )
        .await
        .expect("watermark");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (format!("{:032x}", 12), 5, 2),
        "the same row the Rust consumer keeps"
    );
    let no_position = claim(&client, &format!("SELECT exactly_claim('c1', '{}')", seq(20))).await;
    assert!(
        no_position.as_ref().is_err_and(|e| e.starts_with("EXK03")),
        "{no_position:?}"
    );
    for bad in [
        "nope",
        "v7:not-a-uuid",
        "v4:01a20b72-e9d0-7512-928b-bc61ddb08d57",
        "ulid:ZZZ",
    ] {
        let refused = claim(&client, &format!("SELECT exactly_claim('c1', '{bad}')")).await;
        assert!(
            refused.as_ref().is_err_and(|e| e.starts_with("EXK03")),
            "{bad}: {refused:?}"
        );
    }

    // exactly_forget prunes in bounded batches.
    client
        .batch_execute(
            "UPDATE exactly_processed SET processed_at = now() - interval '8 days' WHERE consumer = 'c1'",
        )
        .await
        .expect("age");
    let forgot = |limit: i32| {
        let client = &client;
        async move {
            client
                .query_one("SELECT exactly_forget('c1', interval '7 days', $1)", &[&limit])
                .await
                .expect("forget")
                .get::<_, i64>(0)
        }
    };
    assert_eq!(forgot(3).await, 3);
    assert_eq!(forgot(100).await, 2, "3 + 2 = the 5 keys of c1");
    assert_eq!(forgot(100).await, 0);

    // exactly_enqueue: a UUIDv7 event id from the clock, a jsonb payload stored as its text.
    let id: String = client
        .query_one(
            "SELECT exactly_enqueue('orders', 'OrderPlaced', 'order', 'O-1', '{\"total\": 5}'::jsonb, '{\"trace\": \"t\"}'::jsonb)::text",
            &[],
        )
        .await
        .expect("enqueue")
        .get(0);
    let id = uuid::Uuid::parse_str(&id).expect("a uuid");
    assert_eq!(id.get_version_num(), 7);
    let at = IdempotencyKey::UuidV7(id).embedded_time().expect("time").0;
    assert!((at - now).abs() < 60_000, "the id's time is now: {at} vs {now}");
    let row = client
        .query_one("SELECT convert_from(payload, 'UTF8'), headers::text, status FROM outbox WHERE event_id::text = $1", &[&id.hyphenated().to_string()])
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "{\"total\": 5}");
    assert_eq!(row.get::<_, String>(1), "{\"trace\": \"t\"}");
    assert_eq!(row.get::<_, String>(2), "NEW");
}
