//! Kill `vae train` anywhere, resume it, lose nothing.
//!
//! A reference run trains uninterrupted. Then the same run is started again and again and
//! killed: with SIGKILL at random moments (whatever it is doing: loading, mid-epoch,
//! evaluating, writing a checkpoint), at each step of an epoch's commit (the failpoints of
//! `vaecuda::failpoint`: half-way through writing a file, between the files), and with
//! Ctrl-C. After every kill the run directory must read (run.json, metrics.csv and every
//! checkpoint parse), and `--resume` carries on; every interrupted run must end with
//! last/best/optim-last.safetensors byte-for-byte equal to the reference's, and the same
//! losses in metrics.csv. The counts are printed (`cargo test --test combined kill_resume -- --nocapture`).

use crate::cli_common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vaecuda::checkpoint::TensorFile;
use vaecuda::rng::Rng;
use vaecuda::run::{parse_settings, Metrics};

/// Prints a count past the test harness's capture (which holds back `println!`), so CI's log
/// shows it for passing tests too.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

const CHECKPOINTS: [&str; 3] = ["last.safetensors", "best.safetensors", "optim-last.safetensors"];

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    data: String,
}

impl Setup {
    fn new(n_train: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let data = root.join("data");
        std::fs::create_dir(&data).unwrap();
        cli_common::tiny_dataset(&data, n_train, 200);
        Setup { data: data.to_str().unwrap().to_string(), root, _tmp: tmp }
    }

    /// `vae train` with the run's flags and `--resume` (which starts the run when `out`
    /// holds none yet), so every attempt is the same command.
    fn command(&self, out: &Path, epochs: usize) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vae"));
        c.args(["train", "--device", "cpu", "--data", &self.data, "--hidden", "256", "--latent", "4"])
            .args(["--batch-size", "16", "--epochs", &epochs.to_string(), "--seed", "7", "--resume", "--out"])
            .arg(out)
            .env_remove(vaecuda::failpoint::ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs the command to its end, expecting success.
    fn finish(&self, out: &Path, epochs: usize) {
        let o = self.command(out, epochs).output().unwrap();
        assert!(o.status.success(), "resume failed: {}", String::from_utf8_lossy(&o.stderr));
    }
}

/// The losses (not the timings) of metrics.csv.
fn losses(dir: &Path) -> Vec<String> {
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    csv.lines().map(|l| l.split(',').take(5).collect::<Vec<_>>().join(",")).collect()
}

/// Whatever a killed run left must read: the settings, the metrics, every checkpoint.
fn assert_readable(dir: &Path, when: &str) {
    let run_json = dir.join("run.json");
    if run_json.exists() {
        let text = std::fs::read_to_string(&run_json).unwrap();
        parse_settings(&text).unwrap_or_else(|e| panic!("{when}: run.json unreadable: {e:#}"));
    }
    let metrics = dir.join("metrics.csv");
    if metrics.exists() {
        Metrics::read(&metrics).unwrap_or_else(|e| panic!("{when}: metrics.csv unreadable: {e:#}"));
    }
    for f in CHECKPOINTS {
        let p = dir.join(f);
        if p.exists() {
            TensorFile::read(&p).unwrap_or_else(|e| panic!("{when}: {f} unreadable: {e:#}"));
        }
    }
}

fn assert_same_as_reference(dir: &Path, reference: &Path, what: &str) {
    for f in CHECKPOINTS {
        let read =
            |d: &Path| std::fs::read(d.join(f)).unwrap_or_else(|e| panic!("{what}: {}: {e}", d.join(f).display()));
        let (a, b) = (read(dir), read(reference));
        assert!(a == b, "{what}: {f} differs from the uninterrupted run's");
    }
    assert_eq!(losses(dir), losses(reference), "{what}: metrics.csv losses differ");
}

/// Waits for the child up to `d`; `Some(status)` if it ended by itself.
fn wait_for(child: &mut Child, d: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + d;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

const EPOCHS: usize = 3;

#[test]
fn killed_anywhere_resumes_to_the_same_bytes() {
    let s = Setup::new(600);
    let reference = s.root.join("reference");
    let start = Instant::now();
    s.finish(&reference, EPOCHS);
    let full = start.elapsed();
    println!("uninterrupted run: {:.2} s", full.as_secs_f64());

    // 1. SIGKILL at random moments over a whole run; each chain of kills ends with a run
    //    that gets to finish, then is compared.
    let mut rng = Rng::new(20_261_201);
    let (mut kills, mut chains) = (0, 0);
    let mut before_first_checkpoint = 0;
    while kills < 24 {
        chains += 1;
        let dir = s.root.join(format!("chain{chains}"));
        loop {
            let mut child = s.command(&dir, EPOCHS).spawn().unwrap();
            let delay = full.mul_f64(rng.uniform(0.0, 1.0));
            match wait_for(&mut child, delay) {
                Some(status) => {
                    assert!(status.success(), "chain {chains}: a resumed run failed");
                    break;
                }
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    kills += 1;
                    if !dir.join("optim-last.safetensors").exists() {
                        before_first_checkpoint += 1;
                    }
                    assert_readable(&dir, &format!("chain {chains}, kill after {:.3} s", delay.as_secs_f64()));
                }
            }
        }
        assert_same_as_reference(&dir, &reference, &format!("chain {chains}"));
    }

    // 2. A kill at each step of an epoch's commit, and half-way through each kind of file.
    //    Writes in order: run.json, then per epoch metrics.csv, state, last, best (when
    //    better). After the kill, a resume to the end of the epoch it died in must equal a
    //    run of that many epochs (so last/best rewritten from the state are proven, not
    //    just overwritten later), and a resume to the end must equal the reference.
    let points = [
        ("half-written@1", 1), // run.json: no run yet
        ("half-written@2", 1), // epoch 1's metrics.csv: no checkpoint yet
        ("half-written@3", 1), // epoch 1's state
        ("half-written@4", 1), // epoch 1's last.safetensors, after the commit
        ("half-written@5", 1), // epoch 1's best.safetensors
        ("half-written@7", 2), // epoch 2's state
        ("half-written@8", 2), // epoch 2's last.safetensors
        ("metrics-written@1", 1),
        ("metrics-written@2", 2),
        ("state-written@1", 1),
        ("state-written@2", 2),
        ("last-written@1", 1),
        ("last-written@2", 2),
        ("epoch-saved@2", 2),
    ];
    let partial_references: Vec<PathBuf> = (1..EPOCHS)
        .map(|e| {
            let dir = s.root.join(format!("reference-{e}"));
            s.finish(&dir, e);
            dir
        })
        .collect();
    for (point, epoch) in points {
        let dir = s.root.join(format!("fail-{}", point.replace('@', "-")));
        let o = s.command(&dir, EPOCHS).env(vaecuda::failpoint::ENV, point).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("failpoint"), "{point} did not fire: {err}");
        kills += 1;
        assert_readable(&dir, point);
        s.finish(&dir, epoch);
        assert_same_as_reference(&dir, &partial_references[epoch - 1], &format!("{point}, resumed to epoch {epoch}"));
        s.finish(&dir, EPOCHS);
        assert_same_as_reference(&dir, &reference, point);
    }
    report!(
        "kills survived: {kills} ({} at random moments in {chains} chains, {before_first_checkpoint} of them before the first checkpoint; {} at failpoints); every resumed run ended byte-equal to the uninterrupted one",
        kills - points.len(),
        points.len()
    );
}

/// Ctrl-C mid-epoch: exit 130, a line saying how to continue, and a resume that ends where
/// an uninterrupted run does.
///
/// The signal's moment is drawn from the reference run's training time (from its "training"
/// line to its exit, so process start and data loading do not count), and every signal that
/// misses (the run had finished, or was between epochs) halves the next draws: on a loaded
/// CI machine the reference can run several times slower than the attempts after it, and a
/// fixed fraction of its time then lands after the end every time.
#[test]
fn ctrl_c_stops_after_the_step_and_resumes_exactly() {
    let s = Setup::new(3000);
    let reference = s.root.join("reference");
    let mut child = s.command(&reference, 2).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    wait_for_training(&mut out);
    let training_began = Instant::now();
    let o = child.wait_with_output().unwrap();
    let training = training_began.elapsed();
    assert!(o.status.success(), "reference failed: {}", String::from_utf8_lossy(&o.stderr));
    let mut rng = Rng::new(42);
    let (mut mid_epoch, mut attempts, mut scale) = (0, 0, 1.0);
    // Until three stops landed mid-epoch (a signal after the run ended proves nothing).
    while mid_epoch < 3 {
        attempts += 1;
        assert!(attempts <= 20, "only {mid_epoch} of 20 Ctrl-Cs landed mid-epoch");
        let dir = s.root.join(format!("interrupted{attempts}"));
        let mut child = s.command(&dir, 2).spawn().unwrap();
        // Wait until training has begun (the handler is set before that line), then a while.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        wait_for_training(&mut out);
        std::thread::sleep(training.mul_f64(scale * rng.uniform(0.0, 0.6)));
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            scale *= 0.5;
            continue; // it had finished before the signal: nothing to resume
        }
        assert_eq!(o.status.code(), Some(130), "{err}");
        let resume = format!("vae train --out {} --resume", dir.display());
        assert!(err.contains(&resume), "no resume command in: {err}");
        assert!(!err.contains("error"), "{err}");
        if err.contains("stopped in epoch") {
            mid_epoch += 1;
        } else {
            scale *= 0.5;
        }
        assert_readable(&dir, "after Ctrl-C");
        s.finish(&dir, 2);
        assert_same_as_reference(&dir, &reference, &format!("Ctrl-C {attempts}"));
    }
    report!("Ctrl-C: {attempts} sent, {mid_epoch} landed mid-epoch; each stopped run resumed to the same bytes");
}

/// Reads the child's stdout up to the line that says training has begun.
fn wait_for_training(out: &mut impl BufRead) {
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.starts_with("training ") {
        line.clear();
    }
}
