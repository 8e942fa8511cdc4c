//! fio's own example job files (a checked-in subset, see tests/data/fio-examples/README.md): tpio
//! parses each (`--parse-only`) or refuses it with one line naming the unsupported option.

use std::process::Command;

/// The refusal README.md lists for each file.
fn expected() -> Vec<(String, String)> {
    let readme = include_str!("data/fio-examples/README.md");
    readme
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            match cells.as_slice() {
                ["", file, result, ""] if file.ends_with(".fio") => {
                    Some((file.to_string(), result.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
fn every_example_parses_or_is_refused_in_one_line() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fio-examples");
    let listed = expected();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "fio"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "{} examples", files.len());
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let output = Command::new(env!("CARGO_BIN_EXE_tpio"))
            .arg(&path)
            .arg("--parse-only")
            .output()
            .expect("tpio runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.stdout.is_empty(),
            "{name}: parse-only prints nothing"
        );
        let (_, result) = listed
            .iter()
            .find(|(file, _)| *file == name)
            .unwrap_or_else(|| panic!("{name} is not listed in the README"));
        if result == "parses" {
            assert_eq!(output.status.code(), Some(0), "{name}: {stderr}");
            continue;
        }
        assert_eq!(output.status.code(), Some(1), "{name}");
        assert_eq!(stderr.lines().count(), 1, "{name}: one line, got {stderr}");
        let message = stderr.trim_end().strip_prefix("tpio: ").expect("prefix");
        assert!(
            message.starts_with(result.as_str()),
            "{name}: {message:?} does not start with the README's {result:?}"
        );
    }
}
