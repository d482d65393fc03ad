//! Quality of generated digits: a k-nearest-neighbour classifier trained on real digits
//! labels the samples, and exact copies of training images are counted.

use crate::data::digits::Digit;
use serde::Serialize;

/// k-NN on raw 8x8 intensities (squared Euclidean distance, majority vote, nearest wins ties).
pub struct KnnClassifier {
    train: Vec<Digit>,
    k: usize,
}

impl KnnClassifier {
    pub fn new(train: Vec<Digit>, k: usize) -> Self {
        Self { train, k: k.max(1) }
    }

    pub fn predict(&self, pixels: &[u8; 64]) -> u32 {
        let mut d: Vec<(u32, u32)> = self
            .train
            .iter()
            .map(|t| {
                let dist = t
                    .pixels
                    .iter()
                    .zip(pixels)
                    .map(|(&a, &b)| (a as i32 - b as i32).pow(2) as u32)
                    .sum();
                (dist, t.label)
            })
            .collect();
        d.sort_unstable();
        let mut votes = [0usize; 10];
        for &(_, l) in d.iter().take(self.k) {
            votes[l as usize] += 1;
        }
        let best = *votes.iter().max().unwrap_or(&0);
        // Among tied labels, the one of the nearest neighbour (none without training digits).
        d.iter()
            .take(self.k)
            .find(|(_, l)| votes[*l as usize] == best)
            .map_or(0, |x| x.1)
    }

    pub fn accuracy(&self, digits: &[Digit]) -> f64 {
        let ok = digits
            .iter()
            .filter(|d| self.predict(&d.pixels) == d.label)
            .count();
        ok as f64 / digits.len().max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DigitsReport {
    pub samples: usize,
    /// Share of samples the classifier labels as their requested class.
    pub class_accuracy: f64,
    /// Share of samples identical to some training image.
    pub copy_rate: f64,
    /// The classifier's own accuracy on the held-out real digits.
    pub classifier_test_accuracy: f64,
    pub per_class_accuracy: Vec<f64>,
}

/// Score `samples` (requested class, pixels 0..=16) against the training digits.
pub fn report(samples: &[(u32, [u8; 64])], train: &[Digit], test: &[Digit]) -> DigitsReport {
    let knn = KnnClassifier::new(train.to_vec(), 3);
    let mut per = [(0usize, 0usize); 10];
    let mut copies = 0;
    for (c, px) in samples {
        let hit = knn.predict(px) == *c;
        per[*c as usize].0 += hit as usize;
        per[*c as usize].1 += 1;
        copies += train.iter().any(|t| &t.pixels == px) as usize;
    }
    let hits: usize = per.iter().map(|p| p.0).sum();
    DigitsReport {
        samples: samples.len(),
        class_accuracy: hits as f64 / samples.len().max(1) as f64,
        copy_rate: copies as f64 / samples.len().max(1) as f64,
        classifier_test_accuracy: knn.accuracy(test),
        per_class_accuracy: per.iter().map(|p| p.0 as f64 / p.1.max(1) as f64).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_recognises_its_training_points_and_counts_copies() {
        let mk = |label: u32, v: u8| Digit {
            label,
            pixels: [v; 64],
        };
        let train = vec![
            mk(0, 0),
            mk(0, 1),
            mk(1, 15),
            mk(1, 16),
            mk(0, 2),
            mk(1, 14),
        ];
        let knn = KnnClassifier::new(train.clone(), 3);
        assert_eq!(knn.predict(&[3; 64]), 0);
        assert_eq!(knn.predict(&[13; 64]), 1);
        let r = report(&[(0, [1; 64]), (1, [5; 64]), (1, [12; 64])], &train, &train);
        assert_eq!(r.samples, 3);
        assert!((r.copy_rate - 1.0 / 3.0).abs() < 1e-9);
        assert!((r.class_accuracy - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.classifier_test_accuracy, 1.0);
    }
}
