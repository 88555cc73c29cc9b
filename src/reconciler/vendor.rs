//! The engine's side of vendor hooks, ready checks and KVC libraries.

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tracing::info;

use super::{Changes, Engine, Fail, Outcome, Record, State, Step, StepLog};
use crate::config::{ModuleConfig, ReadyKind, Source};
use crate::hooks::{self, kvc};
use crate::kernel::{TemplateVars, expand, expand_all};

/// How often a ready check looks again.
const READY_POLL: Duration = Duration::from_millis(200);
/// Pause between attempts of a ready command.
const READY_RETRY: Duration = Duration::from_secs(1);

/// Nanoseconds since the epoch, to make names unique.
fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

impl Engine<'_> {
    /// Template values for `c` on the target kernel.
    pub(super) fn vars(&self, c: &ModuleConfig) -> TemplateVars {
        TemplateVars::for_config(&self.kernel, c.name.as_str(), c.version.as_deref())
    }

    /// The environment every hook gets: what it runs for.
    fn hook_env(&self, c: &ModuleConfig, out: &Outcome, hook: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("KVCD_MODULE".to_owned(), c.name.to_string()),
            ("KVCD_KERNEL".to_owned(), self.kernel.to_string()),
            ("KVCD_HOOK".to_owned(), hook.to_owned()),
            (
                "KVCD_MODULES".to_owned(),
                c.modules
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            (
                "KVCD_VERSION".to_owned(),
                c.version.clone().unwrap_or_default(),
            ),
        ];
        if let Some(i) = &out.image {
            env.push(("KVCD_IMAGE_REF".to_owned(), i.reference.clone()));
            env.push(("KVCD_IMAGE_DIGEST".to_owned(), i.digest.clone()));
        }
        if let Some(dir) = &out.artifacts {
            env.push(("KVCD_ARTIFACTS_DIR".to_owned(), dir.display().to_string()));
        }
        env
    }

    /// Runs `cmd` as `hook` for `c`, its output logged live and kept in `out`.
    fn run_logged(
        &self,
        c: &ModuleConfig,
        hook: &str,
        mut cmd: std::process::Command,
        timeout: u64,
        step: Step,
        out: &mut Outcome,
    ) -> Result<(), hooks::HookError> {
        cmd.envs(self.hook_env(c, out, hook));
        let lines = RefCell::new(Vec::new());
        let name = c.name.as_str();
        let sink = |is_stderr: bool, line: &str| {
            // A blank line says nothing; it is not a step.
            if line.trim().is_empty() {
                return;
            }
            let detail = format!("{hook}: {line}");
            info!(KVCD_MODULE = %name, KVCD_KERNEL = %self.kernel, KVCD_STEP = step.as_str(), stderr = is_stderr, "{detail}");
            let entry = StepLog { step, detail };
            if let Some(f) = self.on_step {
                f(name, &entry);
            }
            lines.borrow_mut().push(entry);
        };
        let result = hooks::run(hook, cmd, Duration::from_secs(timeout), &sink);
        out.steps.append(&mut lines.into_inner());
        result
    }

    /// Runs the configured hook `which` (e.g. `pre_load`), if there is one.
    pub(super) fn hook(
        &self,
        c: &ModuleConfig,
        which: &str,
        argv: Option<&Vec<String>>,
        out: &mut Outcome,
    ) -> Result<(), Fail> {
        let Some(argv) = argv else { return Ok(()) };
        let vars = self.vars(c);
        let argv = expand_all(argv, &vars)
            .map_err(|e| Fail::at(Step::Hook)(anyhow!("hooks.{which}: {e}")))?;
        self.log(
            out,
            Step::Hook,
            format!("running {which}: {}", argv.join(" ")),
        );
        crate::failpoint::hit(&format!("hook.{which}.before"));
        self.run_logged(
            c,
            which,
            hooks::command(&argv),
            c.hooks.timeout_seconds,
            Step::Hook,
            out,
        )
        .map_err(|e| Fail::at(Step::Hook)(e.into()))?;
        crate::failpoint::hit(&format!("hook.{which}.after"));
        self.log(out, Step::Hook, format!("{which} succeeded"));
        Ok(())
    }

    /// Waits until the config's ready check passes.
    pub(super) fn wait_ready(&self, c: &ModuleConfig, out: &mut Outcome) -> Result<(), Fail> {
        let Some(r) = &c.ready else { return Ok(()) };
        let vars = self.vars(c);
        let fail = |e: anyhow::Error| Fail::at(Step::Ready)(e);
        let timeout = Duration::from_secs(r.timeout_seconds);
        let start = Instant::now();
        match &r.kind {
            ReadyKind::Path(p) => {
                let p = expand(&p.to_string_lossy(), &vars).map_err(|e| fail(e.into()))?;
                self.log(out, Step::Ready, format!("waiting for {p}"));
                while !Path::new(&p).exists() {
                    if start.elapsed() >= timeout {
                        return Err(fail(anyhow!(
                            "ready check: {p} did not appear within {}s",
                            r.timeout_seconds
                        )));
                    }
                    std::thread::sleep(READY_POLL);
                }
                self.log(
                    out,
                    Step::Ready,
                    format!("{p} exists after {:.1}s", start.elapsed().as_secs_f64()),
                );
            }
            ReadyKind::Command(argv) => {
                let argv = expand_all(argv, &vars).map_err(|e| fail(e.into()))?;
                self.log(
                    out,
                    Step::Ready,
                    format!("waiting for {} to succeed", argv.join(" ")),
                );
                loop {
                    let left = timeout.saturating_sub(start.elapsed()).as_secs().max(1);
                    match self.run_logged(c, "ready", hooks::command(&argv), left, Step::Ready, out)
                    {
                        Ok(()) => break,
                        Err(e) if start.elapsed() + READY_RETRY >= timeout => {
                            return Err(fail(anyhow!(
                                "ready check did not pass within {}s; last attempt: {e}",
                                r.timeout_seconds
                            )));
                        }
                        Err(_) => std::thread::sleep(READY_RETRY),
                    }
                }
                self.log(
                    out,
                    Step::Ready,
                    format!("passed after {:.1}s", start.elapsed().as_secs_f64()),
                );
            }
        }
        Ok(())
    }

    /// Runs a KVC library action with the KVC contract, under `hooks.build_timeout_seconds`
    /// for the whole action (the library's podman calls included); counts the podman
    /// calls its `kvc_c_*` helpers make into `out.podman_calls`.
    fn kvc_action(
        &self,
        c: &ModuleConfig,
        action: kvc::KvcAction,
        out: &mut Outcome,
    ) -> Result<(), Fail> {
        let Source::KvcLibrary { libraries } = &c.source else {
            return Err(Fail::at(Step::Kvc)(anyhow!("not a KVC library config")));
        };
        let func = action.function();
        // Counting is a report, not a reason to fail the action.
        // Beside the records, in the runtime directory: the library may run in a transient unit.
        let calls = match kvc::CallLog::new(&self.records.dir().with_file_name("kvc")) {
            Ok(l) => Some(l),
            Err(e) => {
                self.log(
                    out,
                    Step::Kvc,
                    format!("podman calls of {func} are not counted: {e:#}"),
                );
                None
            }
        };
        let mut cmd = kvc::command(
            libraries,
            action,
            c.name.as_str(),
            self.kernel.as_str(),
            self.podman.program(),
            &[],
        );
        if let Some(l) = &calls {
            l.attach(&mut cmd);
        }
        let action_id = format!("{}-{}-{}", std::process::id(), c.name, now_nanos());
        let label = format!("{}={action_id}", kvc::RUN_LABEL_KEY);
        cmd.env(kvc::RUN_LABEL_ENV, &label);
        self.log(
            out,
            Step::Kvc,
            format!(
                "running {func} with KVC_CONTAINER_RUNTIME={}",
                self.podman.program().display()
            ),
        );
        let result = self.run_logged(c, func, cmd, c.hooks.build_timeout_seconds, Step::Kvc, out);
        if matches!(&result, Err(e) if matches!(e.kind, hooks::HookErrorKind::TimedOut(_))) {
            self.remove_left_containers(&label, out);
        }
        let n = calls.as_ref().map_or(0, kvc::CallLog::count);
        out.podman_calls += n;
        if n > 0 {
            self.log(
                out,
                Step::Kvc,
                format!("{func} made {n} podman call(s) through the kvc_c_* helpers"),
            );
        }
        result.map_err(|mut e| {
            // Name the library rather than the bash that ran it.
            e.program = libraries
                .iter()
                .map(|l| l.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            Fail::at(Step::Kvc)(e.into())
        })
    }

    /// Removes the containers of a timed-out library action (its `kvc_c_run`
    /// label): killing a podman client does not stop its container.
    fn remove_left_containers(&self, label: &str, out: &mut Outcome) {
        let calls = self.podman.calls();
        let detail = match self.podman.remove_labelled_containers(label) {
            Ok(ids) if ids.is_empty() => None,
            Ok(ids) => Some(format!(
                "removed {} container(s) the library's kvc_c_run left running: {}",
                ids.len(),
                ids.join(" ")
            )),
            Err(e) => Some(format!(
                "could not remove the containers the library's kvc_c_run left running: {e:#}"
            )),
        };
        out.podman_calls += self.podman.calls() - calls;
        if let Some(d) = detail {
            self.log(out, Step::Kvc, d);
        }
    }

    /// KVC library mode, prepare: the library's build_kmods for the target kernel
    /// (as `kmods-via-containers build NAME KERNEL`); no load hooks run.
    pub(super) fn prepare_kvc(&self, c: &ModuleConfig, out: &mut Outcome) -> Result<(), Fail> {
        self.kvc_action(c, kvc::KvcAction::Build, out)?;
        self.log(
            out,
            Step::Kvc,
            format!(
                "build_kmods succeeded for kernel {}; the library keeps its modules in its own image, so kvcd has no module files to check",
                self.kernel
            ),
        );
        Ok(())
    }

    /// Which configured modules are (not) in the kernel, by exact name with `-`/`_` folded.
    fn missing_modules(&self, c: &ModuleConfig, want_live: bool) -> Result<Vec<String>, Fail> {
        let mut out = Vec::new();
        for m in &c.modules {
            let live = self.kmods.live(m).map_err(Fail::at(Step::Kvc))?.is_some();
            if live != want_live {
                out.push(m.to_string());
            }
        }
        Ok(out)
    }

    /// KVC library mode: build_kmods, in-tree modules in `replace_in_tree` out,
    /// load_kmods, then the kernel's own word on what is loaded. A failure after
    /// in-tree modules went out puts them back.
    pub(super) fn load_kvc(&self, c: &ModuleConfig, out: &mut Outcome) -> Result<(), Fail> {
        self.hook(c, "pre_load", c.hooks.pre_load.as_ref(), out)?;
        self.kvc_action(c, kvc::KvcAction::Build, out)?;
        let mut record = self.current_record(c, out)?;
        let mut changes = Changes::resuming(&record);
        let result = self.replace_and_load_kvc(c, out, &mut record, &mut changes);
        if let Err(Fail(step, err, state)) = result {
            let problems = self.roll_back(out, &changes, &mut record);
            if problems.is_empty() {
                return Err(Fail(step, err, state));
            }
            return Err(Fail(
                step,
                anyhow!("{err:#}; rollback incomplete: {}", problems.join("; ")),
                state,
            ));
        }
        record.complete = true;
        self.records.put(&record).map_err(Fail::at(Step::Record))?;
        Ok(())
    }

    fn replace_and_load_kvc(
        &self,
        c: &ModuleConfig,
        out: &mut Outcome,
        record: &mut Record,
        changes: &mut Changes,
    ) -> Result<(), Fail> {
        for r in &c.replace_in_tree {
            // Taken out by an earlier load: what is live now is the library's.
            if record.removed_in_tree.contains(r) {
                continue;
            }
            if let Some(removal) = super::plan::take_out(r, self.kmods)? {
                self.take_out(r, removal, out, record, changes)?;
            }
        }
        self.kvc_action(c, kvc::KvcAction::Load, out)?;
        let missing = self.missing_modules(c, true)?;
        if !missing.is_empty() {
            return Err(Fail::at(Step::Kvc)(anyhow!(
                "load_kmods succeeded, but the kernel does not have: {}",
                missing.join(", ")
            )));
        }
        self.log(
            out,
            Step::Kvc,
            format!(
                "the kernel has {}",
                c.modules
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        Ok(())
    }

    /// KVC library mode: unload_kmods, then check the modules are gone.
    pub(super) fn unload_kvc(&self, c: &ModuleConfig, out: &mut Outcome) -> Result<(), Fail> {
        self.kvc_action(c, kvc::KvcAction::Unload, out)?;
        let left = self.missing_modules(c, false)?;
        if !left.is_empty() {
            return Err(Fail(
                Step::Kvc,
                anyhow!(
                    "unload_kmods succeeded, but the kernel still has: {}",
                    left.join(", ")
                ),
                State::Busy,
            ));
        }
        // In-tree modules the load took out go back in.
        if let Some(mut record) = self.settled_record(c.name.as_str(), out)? {
            let removed = record.removed_in_tree.clone();
            self.restore(&mut record, &removed, out);
            if !record.removed_in_tree.is_empty() {
                self.records.put(&record).map_err(Fail::at(Step::Record))?;
                return super::unrestored(&record);
            }
        }
        self.records
            .delete(c.name.as_str())
            .map_err(Fail::at(Step::Record))?;
        Ok(())
    }
}
