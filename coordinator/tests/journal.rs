//! The coordinator's journal: a book written before a crash and taken over by a restarted
//! coordinator carries the job on exactly as the first one would have; retried requests whose
//! replies were lost in the crash get the same answer; only the same run's, unended journal
//! is taken over.

mod common;

use common::registration;
use contrail_common::auth::JobToken;
use contrail_common::config::JobConfig;
use contrail_common::proto;
use contrail_common::status::{JobState, WorkerLiveness};
use contrail_coordinator::job::JobBook;
use contrail_coordinator::journal::{Found, Journal};

const HEARTBEAT: u64 = 50;
const TIMEOUT: u64 = 200;
const TTL: u64 = 150;
const REPLACEMENT_WAIT: u64 = 1_000;

fn config() -> JobConfig {
    let mut cfg = JobConfig::default();
    cfg.cluster.world_size = 3;
    cfg.cluster.min_workers = 2;
    cfg.cluster.heartbeat_ms = HEARTBEAT;
    cfg.cluster.worker_timeout_ms = TIMEOUT;
    cfg.cluster.lease_ttl_ms = TTL;
    cfg.cluster.replacement_wait_ms = REPLACEMENT_WAIT;
    cfg.train.micro_batch = 4;
    cfg.train.global_batch = 12;
    cfg.train.seed = 5;
    cfg.validate().expect("test config is valid");
    cfg
}

fn urls(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("memory://j/shard-{i:02}.tar"))
        .collect()
}

fn lease(b: &mut JobBook, id: u64, request_id: u64, now: u64) -> proto::LeaseReply {
    let generation = b.generation();
    b.lease(
        &proto::LeaseRequest {
            worker_id: id,
            generation,
            epoch: 0,
            request_id,
        },
        now,
    )
    .expect("lease")
}

fn complete(b: &mut JobBook, id: u64, lease_id: u64, samples: u64) {
    let generation = b.generation();
    b.complete(
        &proto::CompleteRequest {
            worker_id: id,
            generation,
            lease_id,
            samples,
            ..Default::default()
        },
        0,
    )
    .expect("complete");
}

/// Three workers registered; worker 3 died and the other two regrouped; some shards leased,
/// one completed, steps reported. Deterministic, so two calls give equal books.
fn history() -> (JobBook, Vec<u64>, Vec<u64>) {
    let mut b = JobBook::new(config(), "toml".into(), urls(9), None);
    let ids: Vec<u64> = (0..3u64)
        .map(|r| {
            b.register(&registration("h", &format!("10.0.0.{r}:1"), 100 + r), 0)
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(b.state(), JobState::Running);
    let leases: Vec<u64> = [(ids[0], 1), (ids[1], 2), (ids[2], 3), (ids[0], 4)]
        .iter()
        .map(|&(w, req)| lease(&mut b, w, req, 10).lease_id)
        .collect();
    complete(&mut b, ids[0], leases[0], 40);
    for id in &ids[..2] {
        let g = b.generation();
        b.report_step(
            &proto::StepReport {
                worker_id: *id,
                generation: g,
                step: 7,
                global_samples: 12,
                loss: Some(2.5),
                ..Default::default()
            },
            20,
        )
        .unwrap();
        b.heartbeat(
            &proto::HeartbeatRequest {
                worker_id: *id,
                generation: g,
                ..Default::default()
            },
            150,
        )
        .unwrap();
    }
    b.report_eval(
        &proto::EvalReport {
            worker_id: ids[0],
            generation: b.generation(),
            step: 7,
            knn_top1: 0.5,
            knn_top5: 0.9,
            ..Default::default()
        },
        160,
    )
    .unwrap();
    // Worker 3 falls silent: the survivors regroup as generation 2.
    b.tick(150 + TIMEOUT);
    assert_eq!(b.generation(), 2);
    (b, ids, leases)
}

fn journaled(b: &JobBook) -> JobBook {
    let bytes = serde_json::to_vec(b).expect("encode");
    let back: JobBook = serde_json::from_slice(&bytes).expect("decode");
    back.recovered(config(), "toml", urls(9), Vec::new(), 0)
        .expect("same job")
}

#[test]
fn a_recovered_book_carries_the_job_on_like_the_original() {
    let (mut original, ids, leases) = history();
    let (crashed, _, _) = history();
    let mut recovered = journaled(&crashed);

    let (a, b) = (original.status(400), recovered.status(0));
    assert_eq!(
        (a.state, a.generation, a.step),
        (b.state, b.generation, b.step)
    );
    assert_eq!(a.samples_seen, b.samples_seen);
    assert_eq!(a.shards, b.shards);
    // The status page's curves survive the restart.
    assert_eq!(a.loss_history, vec![(7, 2.5)]);
    assert_eq!(a.loss_history, b.loss_history);
    assert_eq!(a.eval_history.len(), 1);
    assert_eq!(a.eval_history, b.eval_history);
    let members = |s: &contrail_common::status::StatusReport| {
        s.workers
            .iter()
            .map(|w| (w.worker_id, w.rank, w.state, w.shard.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(members(&a), members(&b));
    assert_eq!(b.workers[2].state, WorkerLiveness::Dead);

    // Leases granted before the crash complete on the recovered book, and the shards still
    // pending come out in the same order with the same lease ids.
    let g = recovered.generation();
    for book in [&mut original, &mut recovered] {
        // The survivors' leases went back to the pool at the regroup; a late completion of
        // one still counts (first completion wins).
        complete(book, ids[1], leases[1], 30);
    }
    let next = |book: &mut JobBook| {
        (0..9)
            .map_while(|k| {
                let r = lease(book, ids[k % 2], 1000 + k as u64, 500);
                (!r.exhausted).then_some((r.lease_id, r.shard_url))
            })
            .collect::<Vec<_>>()
    };
    let (from_original, from_recovered) = (next(&mut original), next(&mut recovered));
    assert!(!from_original.is_empty());
    assert_eq!(from_original, from_recovered);
    assert_eq!(recovered.generation(), g);
    assert_eq!(original.status(0).shards, recovered.status(0).shards);
}

#[test]
fn requests_repeated_after_a_lost_reply_get_the_same_answer() {
    let (b, ids, _) = history();
    let mut b = journaled(&b);
    // A lease request retried with its request id: the same lease, not a second shard.
    let first = lease(&mut b, ids[0], 77, 0);
    let again = lease(&mut b, ids[0], 77, 5);
    assert_eq!(
        (first.lease_id, &first.shard_url),
        (again.lease_id, &again.shard_url)
    );
    let other = lease(&mut b, ids[0], 78, 5);
    assert_ne!(other.lease_id, first.lease_id);
    // A registration retried by the same process keeps its worker id.
    let (id, generation) = b
        .register(&registration("h", "10.0.0.0:1", 100), 0)
        .unwrap();
    assert_eq!((id, generation), (ids[0], b.generation()));
}

#[test]
fn a_restarted_clock_gives_every_worker_and_lease_a_full_timeout() {
    let (b, ids, _) = history();
    let mut b = journaled(&b);
    let g = b.generation();
    let leased = lease(&mut b, ids[0], 9, 0);
    // Nobody has been heard on the new clock, yet nobody is dead within the timeout.
    b.tick(TIMEOUT - 1);
    assert_eq!(b.generation(), g);
    assert_eq!(b.state(), JobState::Running);
    // Worker 1 re-attaches (heartbeats); worker 2 never does and is declared dead.
    b.heartbeat(
        &proto::HeartbeatRequest {
            worker_id: ids[0],
            generation: g,
            ..Default::default()
        },
        TIMEOUT - 1,
    )
    .unwrap();
    b.tick(TIMEOUT + 1);
    let s = b.status(TIMEOUT + 1);
    let w2 = s.workers.iter().find(|w| w.worker_id == ids[1]).unwrap();
    assert_eq!(w2.state, WorkerLiveness::Dead);
    // One worker left, below min_workers = 2: it waits for replacements (no new generation
    // yet), and the job fails once none came within replacement_wait_ms.
    assert_eq!((b.state(), b.generation()), (JobState::Running, g));
    let beat = |b: &mut JobBook, t: u64| {
        b.heartbeat(
            &proto::HeartbeatRequest {
                worker_id: ids[0],
                generation: g,
                ..Default::default()
            },
            t,
        )
        .unwrap();
    };
    beat(&mut b, TIMEOUT + REPLACEMENT_WAIT);
    b.tick(TIMEOUT + REPLACEMENT_WAIT);
    assert_eq!(b.state(), JobState::Running);
    beat(&mut b, TIMEOUT + REPLACEMENT_WAIT + 10);
    b.tick(TIMEOUT + REPLACEMENT_WAIT + 10);
    assert_eq!(b.state(), JobState::Failed);
    assert!(
        b.reason().contains("cluster.replacement_wait_ms"),
        "{}",
        b.reason()
    );
    let _ = leased;
}

/// Below `cluster.min_workers` the survivor waits in its regroup call; a replacement that
/// registers in time makes up the numbers, and the two form the next generation together.
#[test]
fn a_replacement_in_time_lifts_a_job_below_min_workers() {
    let (mut b, ids, _) = history();
    let g = b.generation();
    let leave = |b: &mut JobBook, id: u64| {
        b.leave(
            &proto::LeaveRequest {
                worker_id: id,
                generation: g,
                error: "oom".into(),
                ..Default::default()
            },
            400,
        )
        .unwrap();
    };
    leave(&mut b, ids[1]);
    assert_eq!((b.state(), b.generation()), (JobState::Running, g));
    // The survivor's regroup call waits.
    assert_eq!(b.rendezvous(ids[0], g, g, 410).unwrap(), None);
    let (new, _) = b
        .register(&registration("h", "10.0.0.9:1", 999), 420)
        .unwrap();
    b.tick(430);
    assert_eq!(b.generation(), g + 1);
    let r0 = b.rendezvous(ids[0], g, g, 440).unwrap().expect("regrouped");
    assert_eq!((r0.rank, r0.world_size), (0, 2));
    let rn = b.rendezvous(new, g, 0, 440).unwrap().expect("taken in");
    assert!(rn.joining && rn.rank == 1);
}

#[test]
fn a_journal_of_another_job_file_or_dataset_is_refused() {
    let (b, _, _) = history();
    let bytes = serde_json::to_vec(&b).unwrap();
    let back = |_: ()| serde_json::from_slice::<JobBook>(&bytes).unwrap();
    let e = back(())
        .recovered(config(), "other toml", urls(9), Vec::new(), 0)
        .err()
        .expect("changed config refused");
    assert!(e.contains("config differs"), "{e}");
    let e = back(())
        .recovered(config(), "toml", urls(8), Vec::new(), 0)
        .err()
        .expect("changed dataset refused");
    assert!(e.contains("lists 8 shards, not the 9"), "{e}");
    let mut renamed = urls(9);
    renamed[4].push_str(".old");
    let e = back(())
        .recovered(config(), "toml", renamed, Vec::new(), 0)
        .err()
        .expect("renamed shard refused");
    assert!(e.contains("9 shards with other names"), "{e}");
    // The journal holds a digest of the shard list, not the URLs themselves.
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        !text.contains(&urls(9)[4]),
        "shard URLs written into the journal"
    );
}

/// More leases and completions after `history`, by every survivor; one lease left open.
fn more_shard_work(b: &mut JobBook, ids: &[u64]) {
    for (k, id) in ids[..2].iter().enumerate() {
        let l = lease(b, *id, 10 + k as u64, 300);
        complete(b, *id, l.lease_id, 30 + k as u64);
    }
    // A retried request (its reply lost) gets the same lease, then a lease stays open.
    let first = lease(b, ids[0], 20, 310);
    assert_eq!(lease(b, ids[0], 20, 320).lease_id, first.lease_id);
    complete(b, ids[0], first.lease_id, 7);
    lease(b, ids[1], 21, 330);
}

#[test]
fn a_snapshot_and_its_logged_changes_recover_the_book_of_the_end() {
    let (mut b, ids, _) = history();
    let snapshot = serde_json::to_vec(&b).unwrap();
    b.encoded_whole();
    more_shard_work(&mut b, &ids);
    let log = b.take_shard_log();
    assert_eq!(
        log.len(),
        8,
        "5 leases (one retried) and 3 completions: {log:?}"
    );

    let mut from_log = serde_json::from_slice::<JobBook>(&snapshot)
        .unwrap()
        .recovered(config(), "toml", urls(9), log.clone(), 0)
        .expect("the log replays on its snapshot");
    let whole = journaled(&b);
    assert_eq!(
        serde_json::to_value(&from_log).unwrap(),
        serde_json::to_value(&whole).unwrap()
    );
    assert!(
        from_log.take_shard_log().is_empty(),
        "replayed changes are not logged again"
    );

    // A log replayed on another book is refused, not applied differently.
    let (mut other, _, _) = history();
    more_shard_work(&mut other, &ids);
    let e = match serde_json::from_slice::<JobBook>(&serde_json::to_vec(&other).unwrap())
        .unwrap()
        .recovered(config(), "toml", urls(9), log, 0)
    {
        Err(e) => e,
        Ok(_) => panic!("a log that does not follow its snapshot must be refused"),
    };
    assert!(e.contains("replaying it grants"), "{e}");
}

#[tokio::test]
async fn a_journal_is_read_as_its_snapshot_then_its_deltas_in_order() {
    let dir = std::env::temp_dir().join(format!("contrail-journal-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("file://{}/coordinator-journal.json", dir.display());
    let token = JobToken::generate().unwrap();
    let j = Journal::new(url.clone(), "", Some(&token));

    // An older snapshot's deltas are left behind, as by a coordinator that crashed.
    j.write_delta(7, 1, j.encode_delta(7, 1, Vec::new()).unwrap())
        .await
        .unwrap();
    let (mut b, ids, _) = history();
    j.write(j.encode(&b, 8).unwrap()).await.unwrap();
    b.encoded_whole();
    more_shard_work(&mut b, &ids);
    let mut log = b.take_shard_log();
    let second = log.split_off(3);
    j.write_delta(8, 1, j.encode_delta(8, 1, log.clone()).unwrap())
        .await
        .unwrap();
    j.write_delta(8, 2, j.encode_delta(8, 2, second.clone()).unwrap())
        .await
        .unwrap();
    // Delta 4 without a 3 is never read: the log ends at the first one missing.
    j.write_delta(8, 4, j.encode_delta(8, 4, log.clone()).unwrap())
        .await
        .unwrap();

    let Found::Book {
        book,
        log: read,
        deltas,
    } = j.load().await.unwrap()
    else {
        panic!("the same run's journal must be taken over");
    };
    assert_eq!(deltas, 2);
    log.extend(second);
    assert_eq!(read, log);
    let back = book.recovered(config(), "toml", urls(9), read, 0).unwrap();
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(journaled(&b)).unwrap()
    );

    // A delta that names another snapshot where this one's should be is an error.
    std::fs::copy(
        dir.join("coordinator-journal.json.log/0000000000000007-00000001.json"),
        dir.join("coordinator-journal.json.log/0000000000000008-00000001.json"),
    )
    .unwrap();
    let e = match j.load().await {
        Err(e) => format!("{e:#}"),
        Ok(_) => panic!("a delta of another journal must be an error"),
    };
    assert!(e.contains("names another journal"), "{e}");

    // Listed before a new coordinator writes, every delta there is an earlier one's.
    let stale = j.list_deltas().await.unwrap();
    assert_eq!(stale.len(), 4, "{stale:?}");
    j.remove(&stale).await.unwrap();
    let left = std::fs::read_dir(dir.join("coordinator-journal.json.log"))
        .unwrap()
        .count();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn only_the_same_runs_unended_journal_is_taken_over() {
    let dir = std::env::temp_dir().join(format!("contrail-journal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("file://{}/coordinator-journal.json", dir.display());
    let token = JobToken::generate().unwrap();
    let mine = Journal::new(url.clone(), "", Some(&token));
    assert!(matches!(mine.load().await.unwrap(), Found::Nothing));

    let (b, _, _) = history();
    mine.write(mine.encode(&b, 1).unwrap()).await.unwrap();
    match mine.load().await.unwrap() {
        Found::Book { book, .. } => assert_eq!(book.generation(), b.generation()),
        _ => panic!("the same run's journal must be taken over"),
    }
    let theirs = Journal::new(url.clone(), "", Some(&JobToken::generate().unwrap()));
    match theirs.load().await.unwrap() {
        Found::Ignored(why) => assert!(why.contains("another run"), "{why}"),
        _ => panic!("another run's journal must not be taken over"),
    }

    // An ended job is not taken over: leave every worker finished.
    let mut ended = b;
    for id in 1..=3u64 {
        let g = ended.generation();
        let _ = ended.leave(
            &proto::LeaveRequest {
                worker_id: id,
                generation: g,
                finished: true,
                ..Default::default()
            },
            500,
        );
    }
    assert_eq!(ended.state(), JobState::Finished);
    mine.write(mine.encode(&ended, 2).unwrap()).await.unwrap();
    match mine.load().await.unwrap() {
        Found::Ignored(why) => assert!(why.contains("already ended"), "{why}"),
        _ => panic!("an ended job's journal must not be taken over"),
    }

    // A damaged journal is an error, never silently replaced.
    std::fs::write(dir.join("coordinator-journal.json"), b"{not json").unwrap();
    let e = match mine.load().await {
        Err(e) => format!("{e:#}"),
        Ok(_) => panic!("a damaged journal must be an error"),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(e.contains("not readable"), "{e}");
}

/// Not a test: prints the journal's size and the time to encode and write it for large shard
/// counts (docs/architecture.md quotes it).
/// `cargo test --release -p contrail-coordinator --test journal -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement, run by hand"]
async fn journal_size_and_write_time_at_scale() {
    let dir = std::env::temp_dir().join(format!("contrail-journal-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let j = Journal::new(
        format!("file://{}/coordinator-journal.json", dir.display()),
        "",
        None,
    );
    for shards in [1_000usize, 10_000, 100_000] {
        let mut b = JobBook::new(config(), "toml".into(), urls(shards), None);
        let ids: Vec<u64> = (0..3u64)
            .map(|r| {
                b.register(&registration("h", &format!("10.0.0.{r}:1"), 0), 0)
                    .unwrap()
                    .0
            })
            .collect();
        // Half the epoch leased and completed, 3 shards in flight.
        for k in 0..shards / 2 + 3 {
            let l = lease(&mut b, ids[k % 3], k as u64 + 1, 0);
            if k < shards / 2 {
                complete(&mut b, ids[k % 3], l.lease_id, 1_000);
            }
        }
        let started = std::time::Instant::now();
        let reps = 5;
        let mut bytes = 0;
        for _ in 0..reps {
            let encoded = j.encode(&b, 1).unwrap();
            bytes = encoded.len();
            j.write(encoded).await.unwrap();
        }
        let each = started.elapsed().as_secs_f64() / f64::from(reps);
        eprintln!(
            "{shards:>7} shards: journal {:.1} KiB, encode + write {:.2} ms",
            bytes as f64 / 1024.0,
            each * 1000.0
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
