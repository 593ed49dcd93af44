//! Training keeps Burn's differentiable path through `conv2d_activation`: the flex kernel that
//! adds the bias and applies SiLU in the convolution's output loop is for inference only, so an
//! autodiff input must be passed to Burn's conv2d + SiLU, with the same values and gradients.

#![cfg(feature = "flex")]

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Distribution, Tensor};
use kiln_models::device::read_floats;
use kiln_models::nn::{Activation, conv2d_activation};

#[test]
fn autodiff_inputs_get_burns_values_and_gradients() {
    let device = Device::flex().autodiff();
    let conv = Conv2dConfig::new([3, 4], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device);
    let x = Tensor::<4>::random([2, 3, 6, 6], Distribution::Default, &device).require_grad();

    let fused = conv2d_activation(&conv, x.clone(), Activation::Silu);
    let fused_grads = fused.clone().sum().backward();
    let reference = silu(conv.forward(x.clone()));
    let reference_grads = reference.clone().sum().backward();

    assert_eq!(read_floats(fused).unwrap(), read_floats(reference).unwrap());
    let weight_grad = |grads| read_floats(conv.weight.grad(grads).expect("the weight has a gradient")).unwrap();
    assert_eq!(weight_grad(&fused_grads), weight_grad(&reference_grads));
    let input_grad = |grads| read_floats(x.grad(grads).expect("the input has a gradient")).unwrap();
    assert_eq!(input_grad(&fused_grads), input_grad(&reference_grads));
}
