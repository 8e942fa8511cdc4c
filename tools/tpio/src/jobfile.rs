//! fio job files: a small ini reader and the translation of sections into job options.
//!
//! Format (a subset of fio's): `[section]` headers, `key=value` or bare `key` lines, comments from
//! `#` or `;` at the start of a line, blank lines ignored, blanks around keys and values trimmed.
//! `[global]` sections hold defaults for the jobs that *follow* them (as in fio, a later `[global]`
//! does not affect earlier jobs). Every other section is one job named after the section.
//!
//! `include FILE` pulls another file's lines in at that point (relative to the including file);
//! `${VAR}` in a line is replaced by the environment variable `VAR` (an unset one is an error), and
//! fio's `$ncpus` and `$pagesize` by their values. A key that is not one of tpio's options stops
//! the load with `not supported: KEY` and its place in the file.
//!
//! Each job's lines become clap arguments (`key=value` → `--key=value`, `key` → `--key`) in this
//! order: globals, `--name=SECTION`, the section's own lines, then the command line. Because every
//! option overrides itself, the last one wins: a section overrides `[global]` and the command line
//! overrides the file. The keys are therefore exactly the command-line option names.

use std::path::Path;

/// A job file could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    /// The file could not be read.
    #[error("cannot read job file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is neither a section header, a key nor a comment.
    #[error("{path}:{line}: cannot parse `{text}`: expected [section], key=value or a bare key")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A key appears before any section.
    #[error("{path}:{line}: `{text}` comes before any [section]: put it under [global] or a job")]
    OutsideSection {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A key that names no tpio option (fio options tpio does not implement land here).
    #[error("not supported: {key} ({path}:{line})")]
    NotSupported {
        /// The option as written.
        key: String,
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
    /// `${VAR}` names an unset environment variable.
    #[error("{path}:{line}: ${{{name}}} is not set in the environment")]
    Unset {
        /// The variable.
        name: String,
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
    /// `include` nests too deeply (a file including itself).
    #[error("{path}: include nested more than 16 deep (does a file include itself?)")]
    IncludeDepth {
        /// The file.
        path: String,
    },
    /// The file defines no job.
    #[error("{path} defines no job: add a [jobname] section")]
    NoJobs {
        /// The file.
        path: String,
    },
}

/// One `key[=value]` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The option name.
    pub key: String,
    /// Its value, `None` for a bare flag.
    pub value: Option<String>,
}

impl Entry {
    /// The clap argument this line stands for: `--key=value` or `--key`.
    pub fn to_arg(&self) -> String {
        match &self.value {
            Some(value) => format!("--{}={}", self.key, value),
            None => format!("--{}", self.key),
        }
    }
}

/// One `[name]` section and its lines, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The name between the brackets.
    pub name: String,
    /// Its lines.
    pub entries: Vec<Entry>,
}

/// A job from a file: its name and its arguments (globals first, then its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileJob {
    /// Section name.
    pub name: String,
    /// clap arguments, without the program name.
    pub args: Vec<String>,
    /// The section's own lines as written (key, value or `""`): fio's `job options`.
    pub options: Vec<(String, String)>,
    /// The `[global]` lines above it as written: fio's `global options`.
    pub globals: Vec<(String, String)>,
}

impl Entry {
    /// The line as fio echoes it in JSON: (key, value), `""` for a bare flag.
    pub fn as_pair(&self) -> (String, String) {
        (self.key.clone(), self.value.clone().unwrap_or_default())
    }
}

/// One line of a job file after includes: where it came from and its text.
#[derive(Debug, Clone)]
struct SourceLine {
    path: String,
    line: usize,
    text: String,
}

/// Replaces `${VAR}` with the environment's value and `$ncpus`/`$pagesize` with theirs.
fn expand_variables(path: &str, line: usize, text: &str) -> Result<String, JobFileError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(body) = after.strip_prefix('{') {
            if let Some(end) = body.find('}') {
                let name = &body[..end];
                let value = std::env::var(name).map_err(|_| JobFileError::Unset {
                    name: name.to_string(),
                    path: path.to_string(),
                    line,
                })?;
                out.push_str(&value);
                rest = &body[end + 1..];
                continue;
            }
        }
        let keyword = ["ncpus", "pagesize"]
            .into_iter()
            .find(|keyword| after.starts_with(keyword));
        match keyword {
            Some("ncpus") => {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                out.push_str(&cpus.to_string());
                rest = &after[5..];
            }
            Some(_) => {
                // SAFETY: sysconf has no memory effects.
                let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
                out.push_str(&page.max(4096).to_string());
                rest = &after[8..];
            }
            None => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads `path` into lines, following `include` lines (relative to the including file).
fn read_lines(path: &Path, depth: usize, out: &mut Vec<SourceLine>) -> Result<(), JobFileError> {
    let label = path.display().to_string();
    if depth > 16 {
        return Err(JobFileError::IncludeDepth { path: label });
    }
    let text = std::fs::read_to_string(path).map_err(|source| JobFileError::Read {
        path: label.clone(),
        source,
    })?;
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if let Some(included) = trimmed.strip_prefix("include ") {
            let included = expand_variables(&label, index + 1, included.trim())?;
            let base = path.parent().unwrap_or_else(|| Path::new("."));
            read_lines(&base.join(included), depth + 1, out)?;
            continue;
        }
        out.push(SourceLine {
            path: label.clone(),
            line: index + 1,
            text: expand_variables(&label, index + 1, raw)?,
        });
    }
    Ok(())
}

/// Parses ini `text`; `path` only labels error messages.
pub fn parse_ini(path: &str, text: &str) -> Result<Vec<Section>, JobFileError> {
    let lines: Vec<SourceLine> = text
        .lines()
        .enumerate()
        .map(|(index, raw)| SourceLine {
            path: path.to_string(),
            line: index + 1,
            text: raw.to_string(),
        })
        .collect();
    parse_lines(&lines, &|_| true)
}

/// Parses lines into sections; a key for which `known` is false is refused as not supported.
fn parse_lines(
    lines: &[SourceLine],
    known: &dyn Fn(&str) -> bool,
) -> Result<Vec<Section>, JobFileError> {
    let mut sections: Vec<Section> = Vec::new();
    for source in lines {
        let path = source.path.as_str();
        let index = source.line - 1;
        let line = source.text.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let syntax = || JobFileError::Syntax {
            path: path.to_string(),
            line: index + 1,
            text: line.to_string(),
        };
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.strip_suffix(']').ok_or_else(syntax)?.trim();
            if name.is_empty() {
                return Err(syntax());
            }
            sections.push(Section {
                name: name.to_string(),
                entries: Vec::new(),
            });
            continue;
        }
        // fio drops a comment after the value (`numjobs=4\t; four threads`).
        let line = match line.find([';', '#']) {
            Some(at) if line[..at].ends_with(char::is_whitespace) => line[..at].trim_end(),
            _ => line,
        };
        let (key, value) = match line.split_once('=') {
            Some((key, value)) => (key.trim(), Some(value.trim().to_string())),
            None => (line, None),
        };
        if key.is_empty() || key.contains(char::is_whitespace) || key.starts_with('-') {
            return Err(syntax());
        }
        if !known(key) {
            return Err(JobFileError::NotSupported {
                key: key.to_string(),
                path: path.to_string(),
                line: index + 1,
            });
        }
        let section = sections
            .last_mut()
            .ok_or_else(|| JobFileError::OutsideSection {
                path: path.to_string(),
                line: index + 1,
                text: line.to_string(),
            })?;
        section.entries.push(Entry {
            key: key.to_string(),
            value,
        });
    }
    Ok(sections)
}

/// Turns sections into jobs: each non-global section, preceded by the `[global]` lines above it.
pub fn jobs_from_sections(path: &str, sections: &[Section]) -> Result<Vec<FileJob>, JobFileError> {
    let mut globals: Vec<Entry> = Vec::new();
    let mut jobs = Vec::new();
    for section in sections {
        if section.name == "global" {
            globals.extend(section.entries.iter().cloned());
            continue;
        }
        let mut args: Vec<String> = globals.iter().map(Entry::to_arg).collect();
        args.push(format!("--name={}", section.name));
        args.extend(section.entries.iter().map(Entry::to_arg));
        jobs.push(FileJob {
            name: section.name.clone(),
            args,
            options: section.entries.iter().map(Entry::as_pair).collect(),
            globals: globals.iter().map(Entry::as_pair).collect(),
        });
    }
    if jobs.is_empty() {
        return Err(JobFileError::NoJobs {
            path: path.to_string(),
        });
    }
    Ok(jobs)
}

/// Reads and parses the job file at `path` (following includes), refusing keys for which
/// `known` is false; with `only` non-empty, keeps just the job sections named there (fio's
/// `--section`).
pub fn load(
    path: &Path,
    known: &dyn Fn(&str) -> bool,
    only: &[String],
) -> Result<Vec<FileJob>, JobFileError> {
    let label = path.display().to_string();
    let mut lines = Vec::new();
    read_lines(path, 0, &mut lines)?;
    let mut sections = parse_lines(&lines, known)?;
    if !only.is_empty() {
        sections.retain(|section| section.name == "global" || only.contains(&section.name));
    }
    jobs_from_sections(&label, &sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
; a comment
[global]
ioengine=null
bs = 8k
time_based

[first]
rw=randread
# another comment
[global]
iodepth=4
[second]
bs=16k
";

    #[test]
    fn sections_keys_and_flags() {
        let sections = parse_ini("t.fio", FILE).expect("valid file");
        assert_eq!(sections.len(), 4);
        assert_eq!(sections[0].name, "global");
        assert_eq!(
            sections[0].entries[1],
            Entry {
                key: "bs".into(),
                value: Some("8k".into())
            }
        );
        assert_eq!(
            sections[0].entries[2],
            Entry {
                key: "time_based".into(),
                value: None
            }
        );
    }

    #[test]
    fn globals_apply_to_following_jobs_only() {
        let sections = parse_ini("t.fio", FILE).expect("valid file");
        let jobs = jobs_from_sections("t.fio", &sections).expect("two jobs");
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            jobs[0].args,
            [
                "--ioengine=null",
                "--bs=8k",
                "--time_based",
                "--name=first",
                "--rw=randread"
            ]
        );
        assert_eq!(
            jobs[1].args,
            [
                "--ioengine=null",
                "--bs=8k",
                "--time_based",
                "--iodepth=4",
                "--name=second",
                "--bs=16k"
            ]
        );
    }

    #[test]
    fn includes_variables_and_unknown_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("common.fio"),
            "[global]\nbs=${TPIO_TEST_BS}\n",
        )
        .expect("write");
        let main = dir.path().join("main.fio");
        std::fs::write(&main, "include common.fio\n[a]\nsize=1m\n[b]\nsize=2m\n").expect("write");
        std::env::set_var("TPIO_TEST_BS", "8k");
        let jobs = load(&main, &|_| true, &[]).expect("loads");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].args[0], "--bs=8k");
        assert_eq!(jobs[0].globals, [("bs".to_string(), "8k".to_string())]);
        assert_eq!(jobs[1].options, [("size".to_string(), "2m".to_string())]);
        let only_b = load(&main, &|_| true, &["b".to_string()]).expect("loads");
        assert_eq!(only_b.len(), 1);
        assert_eq!(only_b[0].name, "b");
        let err = load(&main, &|key| key != "size", &[]).expect_err("refused");
        assert!(
            err.to_string().starts_with("not supported: size ("),
            "{err}"
        );
        std::fs::write(&main, "[a]\nbs=${TPIO_SURELY_UNSET_VAR}\n").expect("write");
        let err = load(&main, &|_| true, &[]).expect_err("unset");
        assert!(err.to_string().contains("TPIO_SURELY_UNSET_VAR"), "{err}");
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse_ini("x.fio", "[ok]\n[broken\n").expect_err("unclosed header");
        assert!(err.to_string().contains("x.fio:2"), "{err}");
        let err = parse_ini("x.fio", "bs=4k\n").expect_err("key outside section");
        assert!(err.to_string().contains("before any [section]"), "{err}");
        let err = jobs_from_sections(
            "x.fio",
            &parse_ini("x.fio", "[global]\nbs=4k\n").unwrap_or_default(),
        )
        .expect_err("no jobs");
        assert!(err.to_string().contains("defines no job"), "{err}");
    }
}
