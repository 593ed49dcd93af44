//! kiln's training: one engine (`engine`: the epoch driver every run is a task of, on burn-train's
//! Learner) and its tasks: the student (`run`, `student`: YOLOv8 losses, EMA, augmentation) and the
//! teachers (`teacher`: SAM and GroundingDINO LoRA fine-tuning), with COCO evaluation (`eval`), and
//! the leaves they share: errors, optimisers and schedules, split loading, plots.
//!
//! Dependencies point one way: tasks (`run`, `teacher`, `commands`) → `engine` → leaves (`error`,
//! `optim`, `split`, `plots`, `eval`, `loss`, `data`, `augment`).

pub mod augment;
pub mod characteristics;
pub mod commands;
pub mod data;
pub mod distill;
pub mod engine;
pub mod error;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod plots;
pub mod presets;
pub mod run;
pub mod split;
pub mod student;
pub mod teacher;

pub use engine::Verbosity;
pub use error::TrainError;

/// The module graph of this crate, read from its sources: no cycle, and dependencies point one
/// way (tasks → engine → leaves), so a newcomer can read the leaves first.
#[cfg(test)]
mod module_graph {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    const TASKS: &[&str] = &["commands", "run", "teacher", "student", "distill"];
    const ENGINE: &str = "engine";

    /// Top-level module → the top-level modules its files name as `crate::X`.
    fn graph() -> BTreeMap<String, BTreeSet<String>> {
        fn walk(dir: &Path, top: Option<&str>, graph: &mut BTreeMap<String, BTreeSet<String>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_stem().unwrap().to_string_lossy().to_string();
                if path.is_dir() {
                    walk(&path, Some(top.unwrap_or(&name)), graph);
                } else if path.extension().is_some_and(|e| e == "rs") && !(top.is_none() && name == "lib") {
                    let module = top.unwrap_or(&name).to_string();
                    let text = std::fs::read_to_string(&path).unwrap();
                    let uses = graph.entry(module.clone()).or_default();
                    for (i, _) in text.match_indices("crate::") {
                        let rest = &text[i + 7..];
                        let target: String =
                            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                        if !target.is_empty() && target != module && target.chars().next().unwrap().is_lowercase() {
                            uses.insert(target);
                        }
                    }
                }
            }
        }
        let mut graph = BTreeMap::new();
        walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), None, &mut graph);
        graph
    }

    #[test]
    fn modules_form_no_cycle_and_point_from_tasks_to_engine_to_leaves() {
        let graph = graph();
        assert!(graph.contains_key(ENGINE) && graph.contains_key("run") && graph.contains_key("error"), "{graph:?}");
        // Depth-first search for a back edge.
        fn visit<'a>(
            node: &'a str,
            graph: &'a BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) {
            if let Some(start) = path.iter().position(|n| *n == node) {
                panic!("module cycle: {} -> {node}", path[start..].join(" -> "));
            }
            if !done.insert(node) {
                return;
            }
            path.push(node);
            for next in graph.get(node).into_iter().flatten() {
                visit(next, graph, path, done);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for node in graph.keys() {
            visit(node, &graph, &mut Vec::new(), &mut done);
        }
        for (module, uses) in &graph {
            let layer = |m: &str| {
                if TASKS.contains(&m) {
                    2
                } else if m == ENGINE {
                    1
                } else {
                    0
                }
            };
            for used in uses {
                assert!(
                    layer(used) < layer(module)
                        || (layer(module) == 2 && layer(used) == 2)
                        || layer(module) == 0 && layer(used) == 0,
                    "{module} (layer {}) uses {used} (layer {})",
                    layer(module),
                    layer(used)
                );
            }
        }
    }
}
