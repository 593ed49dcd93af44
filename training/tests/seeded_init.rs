//! A seeded student starts from the same numbers whatever else the process draws.
//!
//! Its own test binary: flex's generator is one per process, and the library's unit tests, run in
//! parallel threads, draw from it while this test seeds it (CI caught the interleaving once).

#![cfg(feature = "flex")]

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use kiln_training::engine::init_seeded;

/// Every value of `model`'s parameters, in the module's order.
fn parameter_values<M: Module>(model: &M) -> Vec<f32> {
    struct Values(Vec<f32>);
    impl burn::module::ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            self.0.extend(kiln_models::device::read_floats(param.val()).expect("readable"));
        }
    }
    let mut values = Values(Vec::new());
    model.visit(&mut values);
    values.0
}

/// Burn draws a parameter at its first use. Left lazy, a seeded student took its numbers from
/// whatever used the generator first (or, moved to LibTorch, from LibTorch's unseeded one).
#[test]
fn a_seeded_student_is_drawn_at_once() {
    let config = "yolov8n-seg".parse::<kiln_models::yolo::YoloConfig>().unwrap().with_num_classes(4);
    let host = Device::flex().autodiff();
    let first = parameter_values(&init_seeded(5, &host, |on| config.init(on)));
    let second = init_seeded(5, &host, |on| config.init(on));
    // Another draw from the same generator before the student is first used.
    let _ = Tensor::<2>::random([64, 64], burn::tensor::Distribution::Default, &host);
    let second = parameter_values(&second);
    assert_eq!(first.len(), second.len());
    assert!(first == second, "the same seed drew different students");
    let other = parameter_values(&init_seeded(6, &host, |on| config.init(on)));
    assert!(first != other, "another seed drew the same student");
}
