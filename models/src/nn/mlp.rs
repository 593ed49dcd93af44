//! The transformer heads' `MLP(input_dim, hidden_dim, output_dim, num_layers)` (DETR's, as SAM's
//! mask decoder (segment_anything/modeling/mask_decoder.py) and GroundingDINO's box heads and query
//! position head have it): Linear layers with ReLU between them.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

/// The mask decoder's `MLP(input_dim, hidden_dim, output_dim, num_layers)`: Linear layers with ReLU
/// between them; keys `layers.<i>`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(input_dim: usize, hidden_dim: usize, output_dim: usize, num_layers: usize, device: &Device) -> Self {
        let layers = (0..num_layers)
            .map(|i| {
                let d_in = if i == 0 { input_dim } else { hidden_dim };
                let d_out = if i + 1 == num_layers { output_dim } else { hidden_dim };
                LinearConfig::new(d_in, d_out).init(device)
            })
            .collect();
        Self { layers }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let last = self.layers.len() - 1;
        self.layers.iter().enumerate().fold(x, |x, (i, layer)| {
            let y = layer.forward(x);
            if i < last { relu(y) } else { y }
        })
    }
}
