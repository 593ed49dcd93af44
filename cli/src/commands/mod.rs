//! One module per subcommand: its clap `Args` and a `run` that fills the library's request from
//! them, calls the library, and prints what the user needs to see.

pub mod bench;
pub mod demo;
pub mod detect;
pub mod eval;
pub mod export;
pub mod infer;
pub mod info;
pub mod optimize;
pub mod segment;
pub mod synth;
pub mod train_student;
pub mod train_teacher;
pub mod validate;
