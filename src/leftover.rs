//! Whether a process group a previous server left behind still belongs to its run, judged from
//! `/proc` before anything is signalled after a restart: the boot id must match, and either the
//! leader's pid names a process with exactly the recorded start time, or no process has that
//! pid and the group's remaining members all started after the leader (a group id is not
//! reused while a member lives). Anything else is someone else's and is left alone.
#![forbid(unsafe_code)]

use std::fs;
use std::io;

/// Identifies the current boot; start times in clock ticks only mean something within one.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The current boot id (read once: it cannot change while this process lives).
pub fn boot_id() -> io::Result<String> {
    static READ: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(id) = READ.get() {
        return Ok(id.clone());
    }
    let id = fs::read_to_string(BOOT_ID)?.trim().to_string();
    Ok(READ.get_or_init(|| id).clone())
}

/// What `judge` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The group is the run's: signal it.
    Ours,
    /// Nothing of the group is left.
    Gone,
    /// Something lives under the recorded ids that may not be the run's: why it is left alone.
    NotOurs(String),
}

/// A process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub pgrp: u32,
    /// Clock ticks since boot.
    pub start_ticks: u64,
}

/// Parses a `/proc/<pid>/stat` line; None for a zombie or an unreadable line.
pub fn parse_stat(pid: u32, stat: &str) -> Option<ProcStat> {
    // The command may hold spaces and parentheses: fields resume after the last ')'.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // fields[0] is field 3 (state); pgrp is field 5, start time field 22.
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    Some(ProcStat {
        pid,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(pid, &fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Living processes whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .filter(|p| p.pgrp == pgid)
        .collect()
}

/// Judges the group `pgid` whose leader started at `start_ticks` during boot `recorded_boot`.
pub fn judge(pgid: u32, start_ticks: u64, recorded_boot: Option<&str>) -> Verdict {
    let current_boot = boot_id().ok();
    decide(
        pgid,
        start_ticks,
        recorded_boot,
        current_boot.as_deref(),
        read_stat(pgid),
        &group_members(pgid),
    )
}

/// The rule of `judge` on what was read: `leader` is the process with pid `pgid`, if any.
pub fn decide(
    pgid: u32,
    start_ticks: u64,
    recorded_boot: Option<&str>,
    current_boot: Option<&str>,
    leader: Option<ProcStat>,
    members: &[ProcStat],
) -> Verdict {
    if leader.is_none() && members.is_empty() {
        return Verdict::Gone;
    }
    match (recorded_boot, current_boot) {
        (None, _) => return Verdict::NotOurs("the run record has no boot id".into()),
        (_, None) => return Verdict::NotOurs("the current boot id cannot be read".into()),
        (Some(then), Some(now)) if then != now => {
            return Verdict::NotOurs(
                "the machine was restarted since the run started (boot id differs)".into(),
            )
        }
        _ => {}
    }
    match leader {
        Some(p) if p.start_ticks == start_ticks => Verdict::Ours,
        Some(p) => Verdict::NotOurs(format!(
            "process {pgid} is another process now (started at tick {}, the run's at tick \
             {start_ticks})",
            p.start_ticks
        )),
        None if members.iter().all(|m| m.start_ticks >= start_ticks) => Verdict::Ours,
        None => Verdict::NotOurs(format!(
            "process group {pgid} has members older than the run's script"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: u32, pgrp: u32, start_ticks: u64) -> ProcStat {
        ProcStat {
            pid,
            pgrp,
            start_ticks,
        }
    }

    #[test]
    fn stat_lines() {
        let line = "42 (a) b) c) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0";
        assert_eq!(parse_stat(42, line), Some(proc(42, 42, 987654)));
        let zombie = "42 (sh) Z 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0";
        assert_eq!(parse_stat(42, zombie), None);
        assert_eq!(parse_stat(42, "42 (sh) S 1"), None);
        assert_eq!(parse_stat(42, "garbage"), None);
    }

    #[test]
    fn own_process_reads() {
        let me = read_stat(std::process::id()).unwrap();
        assert!(me.start_ticks > 0);
        assert!(!boot_id().unwrap().is_empty());
    }

    #[test]
    fn the_rule() {
        let b = Some("boot-a");
        let decide_with = |recorded, leader, members: &[ProcStat]| {
            decide(100, 5000, recorded, b, leader, members)
        };
        // Exact leader: signalled.
        let leader = proc(100, 100, 5000);
        assert_eq!(decide_with(b, Some(leader), &[leader]), Verdict::Ours);
        // A recycled pid (other start time), even one that started later: left alone.
        for ticks in [4000, 5001, 9000] {
            let other = proc(100, 100, ticks);
            assert!(matches!(
                decide_with(b, Some(other), &[other]),
                Verdict::NotOurs(_)
            ));
        }
        // Another boot, or no boot id recorded: left alone.
        assert!(matches!(
            decide_with(Some("boot-b"), Some(leader), &[leader]),
            Verdict::NotOurs(_)
        ));
        assert!(matches!(
            decide_with(None, Some(leader), &[leader]),
            Verdict::NotOurs(_)
        ));
        assert!(matches!(
            decide(100, 5000, b, None, Some(leader), &[leader]),
            Verdict::NotOurs(_)
        ));
        // Leader gone, members of the group left: signalled, unless one is older.
        assert_eq!(decide_with(b, None, &[proc(7, 100, 5100)]), Verdict::Ours);
        assert!(matches!(
            decide_with(b, None, &[proc(7, 100, 5100), proc(8, 100, 10)]),
            Verdict::NotOurs(_)
        ));
        // Nothing left.
        assert_eq!(decide_with(b, None, &[]), Verdict::Gone);
        assert_eq!(decide_with(Some("boot-b"), None, &[]), Verdict::Gone);
    }
}
