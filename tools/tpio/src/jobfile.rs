//! fio job files: a small ini reader and the translation of sections into job options.
//!
//! Format (a subset of fio's): `[section]` headers, `key=value` or bare `key` lines, comments from
//! `#` or `;` at the start of a line, blank lines ignored, blanks around keys and values trimmed.
//! `[global]` sections hold defaults for the jobs that *follow* them (as in fio, a later `[global]`
//! does not affect earlier jobs). Every other section is one job named after the section.
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
}

/// Parses ini `text`; `path` only labels error messages.
pub fn parse_ini(path: &str, text: &str) -> Result<Vec<Section>, JobFileError> {
    let mut sections: Vec<Section> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
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
        let (key, value) = match line.split_once('=') {
            Some((key, value)) => (key.trim(), Some(value.trim().to_string())),
            None => (line, None),
        };
        if key.is_empty() || key.contains(char::is_whitespace) || key.starts_with('-') {
            return Err(syntax());
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
    let mut globals: Vec<String> = Vec::new();
    let mut jobs = Vec::new();
    for section in sections {
        if section.name == "global" {
            globals.extend(section.entries.iter().map(Entry::to_arg));
            continue;
        }
        let mut args = globals.clone();
        args.push(format!("--name={}", section.name));
        args.extend(section.entries.iter().map(Entry::to_arg));
        jobs.push(FileJob {
            name: section.name.clone(),
            args,
        });
    }
    if jobs.is_empty() {
        return Err(JobFileError::NoJobs {
            path: path.to_string(),
        });
    }
    Ok(jobs)
}

/// Reads and parses the job file at `path`.
pub fn load(path: &Path) -> Result<Vec<FileJob>, JobFileError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| JobFileError::Read {
        path: label.clone(),
        source,
    })?;
    let sections = parse_ini(&label, &text)?;
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
