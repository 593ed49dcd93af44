//! Ultralytics `Bottleneck` and `C2f` (ultralytics/nn/modules/block.py): the CSP bottleneck with two
//! convolutions of YOLOv8. Keys: `cv1`, `cv2`, `m.<i>.cv1`, `m.<i>.cv2`.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::conv::Conv;

#[derive(Module, Debug)]
pub struct Bottleneck {
    pub cv1: Conv,
    pub cv2: Conv,
    pub add: bool,
}

impl Bottleneck {
    /// `Bottleneck(c1, c2, shortcut, g=1, k=((3, 3), (3, 3)), e=1.0)`, as C2f builds it.
    pub fn new(c1: usize, c2: usize, shortcut: bool, device: &Device) -> Self {
        Self {
            cv1: Conv::new(c1, c2, 3, 1, 1, device),
            cv2: Conv::new(c2, c2, 3, 1, 1, device),
            add: shortcut && c1 == c2,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.cv2.forward(self.cv1.forward(x.clone()));
        if self.add { x + y } else { y }
    }
}

#[derive(Module, Debug)]
pub struct C2f {
    pub cv1: Conv,
    pub cv2: Conv,
    pub m: Vec<Bottleneck>,
}

impl C2f {
    /// `cv1`, `cv2`, then each bottleneck's `cv1`, `cv2`: the order `C2f.__init__` creates them.
    pub fn convs_in_construction_order(&mut self) -> Vec<&mut Conv> {
        let mut convs = vec![&mut self.cv1, &mut self.cv2];
        for bottleneck in &mut self.m {
            convs.extend([&mut bottleneck.cv1, &mut bottleneck.cv2]);
        }
        convs
    }

    /// `C2f(c1, c2, n, shortcut, g=1, e=0.5)`.
    pub fn new(c1: usize, c2: usize, n: usize, shortcut: bool, device: &Device) -> Self {
        let c = c2 / 2;
        Self {
            cv1: Conv::new(c1, 2 * c, 1, 1, 1, device),
            cv2: Conv::new((2 + n) * c, c2, 1, 1, 1, device),
            m: (0..n).map(|_| Bottleneck::new(c, c, shortcut, device)).collect(),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut ys = self.cv1.forward(x).chunk(2, 1);
        for block in &self.m {
            let next = block.forward(ys.last().expect("two chunks").clone());
            ys.push(next);
        }
        self.cv2.forward(Tensor::cat(ys, 1))
    }
}
