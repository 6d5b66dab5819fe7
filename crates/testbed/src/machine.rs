//! What benchmarks read about the machine they share with the servers they start: the load
//! average, and how much CPU a process (or a set of them) has used, from `/proc`.

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them (empty when unreadable).
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One process's line of `/proc/PID/stat`, the fields benchmarks use.
#[derive(Debug, Clone)]
pub struct ProcStat {
    pub pid: u32,
    pub parent: u32,
    pub command: String,
    /// CPU seconds the process used (user + system).
    pub cpu: f64,
    /// CPU seconds of its children that exited and were waited for (a server's finished workers).
    pub children_cpu: f64,
}

impl ProcStat {
    /// The process `pid`, if it is alive.
    pub fn of(pid: u32) -> Option<ProcStat> {
        parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// This process.
    pub fn of_self() -> ProcStat {
        parse(&std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat"))
            .expect("parse /proc/self/stat")
    }

    /// Every process alive now.
    pub fn all() -> Vec<ProcStat> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
            .filter_map(|stat| parse(&stat))
            .collect()
    }

    /// `cpu` + `children_cpu`.
    pub fn total_cpu(&self) -> f64 {
        self.cpu + self.children_cpu
    }
}

fn parse(stat: &str) -> Option<ProcStat> {
    // The command sits in parentheses and may hold spaces or parentheses itself.
    let (head, rest) = stat.rsplit_once(") ")?;
    let (pid, command) = head.split_once(" (")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = |at: usize| -> Option<f64> {
        Some(fields.get(at)?.parse::<f64>().ok()? + fields.get(at + 1)?.parse::<f64>().ok()?)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some(ProcStat {
        pid: pid.trim().parse().ok()?,
        parent: fields.get(1)?.parse().ok()?,
        command: command.to_string(),
        cpu: ticks(11)? / hz,
        children_cpu: ticks(13)? / hz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_found_and_has_used_some_cpu() {
        let me = ProcStat::of_self();
        assert_eq!(me.pid, std::process::id());
        let mut spin = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(50) {
            spin = spin.wrapping_add(1);
        }
        std::hint::black_box(spin);
        assert!(ProcStat::of_self().cpu > 0.0);
        assert!(ProcStat::all().iter().any(|p| p.pid == me.pid));
    }

    #[test]
    fn commands_with_spaces_and_parentheses_parse() {
        let line = "42 (a (b) c) S 7 42 42 0 -1 4194560 1 0 0 0 250 50 10 20 20 0 1 0 1 1 1";
        let p = parse(line).unwrap();
        assert_eq!((p.pid, p.parent, p.command.as_str()), (42, 7, "a (b) c"));
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        assert!((p.cpu - 300.0 / hz).abs() < 1e-9);
        assert!((p.children_cpu - 30.0 / hz).abs() < 1e-9);
    }
}
